"""Checkers for notebook 07 (fault tolerance)."""

from .check import Incorrect, exercise

# Streams of (request id, worker, tokens) in arrival order, and what must come out.
_CASES = [
    ([], {}, 0),
    ([("r1", "w0", (1, 2))], {"r1": ("w0", (1, 2))}, 0),
    ([("r1", "w0", (1,)), ("r2", "w1", (2,)), ("r1", "w2", (9,))], {"r1": ("w0", (1,)), "r2": ("w1", (2,))}, 1),
    ([("a", "w1", (5,)), ("a", "w0", (5,)), ("a", "w2", (5,)), ("b", "w0", (7,)), ("b", "w1", (8,))],
     {"a": ("w1", (5,)), "b": ("w0", (7,))}, 3),
]


@exercise("07.first_answers", "exactly-once results: keep the first answer per request id")
def check_first_answers(candidate):
    for stream, answers, duplicates in _CASES:
        got = candidate(list(stream))
        if not (isinstance(got, tuple) and len(got) == 2):
            raise Incorrect(f"return a pair (answers, duplicates); got {got!r}")
        got_answers, got_dups = got
        if not isinstance(got_answers, dict):
            raise Incorrect(f"answers must be a dict id -> (worker, tokens); got {type(got_answers).__name__}")
        if got_answers != answers:
            raise Incorrect(f"for the stream {stream}: expected answers {answers}, got {got_answers}. "
                            "The FIRST answer per id must win; later ones are late duplicates.")
        if got_dups != duplicates:
            raise Incorrect(f"for the stream {stream}: expected {duplicates} duplicates dropped, got {got_dups}")
    return "first answer wins, duplicates counted, on 4 scripted streams"
