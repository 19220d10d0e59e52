"""Generate the tiny LM's training corpus: short texts about distributed inference.

Nothing is downloaded. A seeded random generator fills templates with many slots
(names, counts, ranks, layers, requests, caches) and writes English paragraphs
with some Chinese ones, so the tiny LM learns to write like the course talks.
Same seed, same bytes.

    python scripts/make_corpus.py                    # writes lessons_lib/data/corpus.txt
    python scripts/make_corpus.py --bytes 500000 --out /tmp/corpus.txt
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

NAMES = ["Ada", "Bo", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jun", "Kofi",
         "Lena", "Mei", "Nils", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara", "Uma", "Vik",
         "Wen", "Yuki", "Zoe"]
NAMES_ZH = ["小明", "小红", "李雷", "韩梅梅", "王芳", "张伟", "刘洋", "陈静"]
WORDS = {2: "two", 3: "three", 4: "four", 6: "six", 8: "eight", 12: "twelve", 16: "sixteen",
         24: "twenty-four", 32: "thirty-two", 48: "forty-eight", 64: "sixty-four"}
DEVICES = ["GPU", "GPU", "accelerator", "device"]
MODELS = ["model", "language model", "decoder", "transformer"]
WORKLOADS = ["chat requests", "long prompts", "short questions", "batch jobs", "code completions",
             "summaries of long documents", "translation requests"]
ADJ_FAST = ["fast", "quick", "cheap", "steady"]
LINKS = ["NVLink", "PCIe", "InfiniBand", "Ethernet"]
POLICIES = {
    "round-robin": "sends each new request to the next worker in turn",
    "least-outstanding": "sends each new request to the worker with the fewest requests in flight",
    "power-of-two": "picks two workers at random and sends the request to the less busy one",
    "prefix-aware": "sends a request to the worker that already caches the longest part of its prompt",
    "token-cost": "counts the tokens each worker still has to produce and picks the lightest one",
}
STRATEGIES_ZH = {
    "数据并行": "每张显卡保存完整的模型，处理不同的请求",
    "张量并行": "把每个权重矩阵切成几份，每张显卡只计算其中一份",
    "流水线并行": "把模型的层分成几个阶段，每张显卡负责一个阶段",
}


def num(n: int) -> str:
    return WORDS.get(n, str(n))


def plural(n: int, word: str) -> str:
    return f"{num(n)} {word}" if n == 1 else f"{num(n)} {word}s"


class Writer:
    """Paragraph templates; each method returns one paragraph."""

    def __init__(self, rng: random.Random) -> None:
        self.r = rng

    def pick(self, seq):
        return self.r.choice(seq)

    def pipeline_story(self) -> str:
        r, name = self.r, self.pick(NAMES)
        stages = self.pick([2, 4])
        layers = stages * self.pick([2, 4, 6, 8])
        dev, model = self.pick(DEVICES), self.pick(MODELS)
        per = layers // stages
        s = [f"{name} has a {model} with {layers} layers and {num(stages)} {dev}s.",
             f"{name} splits the layers into {num(stages)} pipeline stages, so each {dev} holds {num(per)} layers.",
             f"Rank 0 runs the embedding and the first {num(per)} layers, then sends the activations to rank 1."]
        if stages > 2:
            s.append(f"Rank {stages - 1} runs the last {num(per)} layers, the final norm and the LM head.")
        mb = self.pick([2, 4, 8])
        s.append(self.pick([
            f"To keep every stage busy, {name} cuts the batch into {num(mb)} micro-batches.",
            f"With only one micro-batch, {stages - 1} of the {num(stages)} stages would wait most of the time.",
            f"The idle time at the start and the end of the schedule is called the pipeline bubble.",
        ]))
        s.append(f"With {num(mb)} micro-batches and {num(stages)} stages, the bubble takes about "
                 f"{stages - 1} out of {mb + stages - 1} time slots.")
        return " ".join(s)

    def tensor_parallel(self) -> str:
        tp = self.pick([2, 4, 8])
        dev = self.pick(DEVICES)
        layer = self.pick(["attention layer", "MLP", "decoder layer"])
        s = [f"In tensor parallelism, each of the {num(tp)} ranks keeps one slice of every weight matrix.",
             self.pick([
                 f"The {layer} is split {num(tp)} ways, so every {dev} does "
                 f"{ {2: 'half', 4: 'a quarter', 8: 'an eighth'}[tp]} of the work.",
                 f"A column-parallel linear layer splits the output features across the {num(tp)} ranks.",
                 f"A row-parallel linear layer splits the input features, and the partial sums are added with an all-reduce.",
             ]),
             self.pick([
                 "Attention heads are split across ranks, so each rank runs its own heads and never needs the others.",
                 f"The query, key and value projections are column-parallel, and the output projection is row-parallel.",
                 "The gate and up projections of the MLP are column-parallel, and the down projection is row-parallel.",
             ]),
             f"Each layer needs one all-reduce in attention and one in the MLP, so the ranks should sit on a "
             f"{self.pick(ADJ_FAST)} link like {self.pick(LINKS[:1])}."]
        if self.r.random() < 0.5:
            s.append("Because the ranks add their partial sums in a different order, the logits are close to, "
                     "but not always bitwise equal to, those of a single process.")
        return " ".join(s)

    def data_parallel(self) -> str:
        dp, name = self.pick([2, 4, 8]), self.pick(NAMES)
        batch = dp * self.pick([4, 8, 16])
        s = [f"{name} serves {self.pick(WORKLOADS)} with data parallelism on {plural(dp, 'replica')}.",
             f"Every replica holds a full copy of the model and answers its own requests.",
             f"A batch of {batch} prompts is split into {num(dp)} parts of {batch // dp}, "
             f"and the outputs are gathered in order.",
             self.pick(["Nothing is summed at inference time, because every replica has the same weights.",
                        "Data parallelism adds throughput, but it does not make one request any faster.",
                        "If the model does not fit on one device, data parallelism alone cannot help."])]
        return " ".join(s)

    def kv_cache(self) -> str:
        layers, kv, hd = self.pick([4, 16, 32, 80]), self.pick([2, 4, 8]), self.pick([32, 64, 128])
        nbytes = self.pick([2, 4])
        per_tok = 2 * layers * kv * hd * nbytes
        s = [self.pick(["The KV cache stores the keys and values of every token the model has seen.",
                        "During decoding, the model keeps the keys and values of past tokens in the KV cache.",
                        "Without a KV cache, every new token would run attention over the whole prompt again."]),
             f"For a model with {layers} layers, {kv} key-value heads and a head size of {hd}, "
             f"the cache grows by {per_tok} bytes per token in {'half' if nbytes == 2 else 'full'} precision.",
             self.pick(["Grouped-query attention shares each key-value head among several query heads, "
                        "so the cache is smaller.",
                        "For long prompts and large batches, the KV cache can use more memory than the weights.",
                        "Paged attention stores the cache in fixed-size blocks, so memory is not wasted on padding.",
                        "A prefix cache lets two requests with the same system prompt share the same keys and values."])]
        if self.r.random() < 0.5:
            s.append("With the cache, each decode step runs the model on one new token, "
                     "and cached generation gives the same tokens as generation without it.")
        return " ".join(s)

    def router(self) -> str:
        policy = self.pick(list(POLICIES))
        workers, req = self.pick([2, 3, 4, 8]), self.r.randint(1, 999)
        w = self.r.randrange(workers)
        s = [f"The router in front of {plural(workers, 'worker')} uses the {policy} policy.",
             f"It {POLICIES[policy]}.",
             f"Request {req} arrives with a prompt of {self.r.randint(8, 2000)} tokens, "
             f"and the router sends it to worker {w}.",
             self.pick(["The p99 latency matters more than the average, because users feel the slow requests.",
                        "When one worker is slow, round-robin keeps sending it work, and the tail latency grows.",
                        "Power-of-two choices is almost as good as checking every worker, and much cheaper.",
                        "A prefix-aware router saves prefill time when many requests share a long system prompt."])]
        return " ".join(s)

    def fault(self) -> str:
        w, name = self.r.randrange(8), self.pick(NAMES)
        t, k = self.pick([1, 2, 3, 5]), self.r.randint(2, 30)
        s = [f"Every worker sends a heartbeat to the router once per second.",
             f"When worker {w} stops sending heartbeats, the router waits {plural(t, 'second')} "
             f"and then marks it as failed.",
             f"The {k} requests that worker {w} had in flight are sent again to other workers, "
             f"so no request is lost.",
             self.pick([f"{name} kills a worker in the middle of a run to check that this really works.",
                        "A tensor-parallel group fails as one unit, because no rank can finish a layer alone.",
                        "Retries must be safe to repeat, so the same request gives the same answer twice."])]
        return " ".join(s)

    def communication(self) -> str:
        p = self.pick([2, 4, 8, 16])
        mb = self.pick([1, 16, 64, 256])
        s = [self.pick([f"A ring all-reduce over {num(p)} ranks takes {2 * (p - 1)} steps.",
                        f"In a ring all-reduce, each of the {num(p)} ranks sends and receives "
                        f"{2 * (p - 1)} chunks of the tensor.",
                        "An all-gather gives every rank the pieces that all the other ranks hold."]),
             f"Sending a {mb} MB tensor costs a fixed latency plus the size divided by the bandwidth.",
             self.pick(["An asynchronous call returns a handle at once, so the rank can compute while the data moves.",
                        "If two ranks both wait to receive before they send, neither can go on, and the program hangs.",
                        "NCCL runs collectives on GPUs, and gloo runs them on CPUs.",
                        f"Inside one node, {self.pick(LINKS[:2])} is fast; between nodes, "
                        f"{self.pick(LINKS[2:])} is slower."])]
        return " ".join(s)

    def memory(self) -> str:
        billions = self.pick([1, 7, 13, 70])
        nbytes = self.pick([2, 4])
        gb = billions * nbytes
        mem = self.pick([24, 40, 80])
        need = -(-gb // mem)
        s = [f"A model with {billions} billion parameters needs about {gb} GB for its weights "
             f"in {'16-bit' if nbytes == 2 else '32-bit'} precision.",
             f"One {self.pick(DEVICES)} has {mem} GB of memory, so the weights alone need at least "
             f"{plural(need, 'device')}." if need > 1 else
             f"One {self.pick(DEVICES)} has {mem} GB of memory, so the weights fit, but the KV cache also needs room.",
             self.pick(["Quantizing the weights to int8 halves the memory of 16-bit weights.",
                        "Tensor parallelism splits the weights, so each device holds only its share.",
                        "Activations at inference are small, because nothing is kept for a backward pass."])]
        return " ".join(s)

    def versions(self) -> str:
        v = self.r.randint(1, 40)
        s = [f"Every replica reports the fingerprint of the model version it serves, and all of them "
             f"must say version {v}.",
             self.pick(["During a rolling update, the router drains one replica, loads the new version on it, "
                        "and only then sends it traffic again.",
                        "A tensor-parallel group must load every shard from the same version, "
                        "or its answers are wrong.",
                        "The weights never change while a model serves requests; only the version can."])]
        return " ".join(s)

    def question(self) -> str:
        name = self.pick(NAMES)
        q, a = self.pick([
            ("Why does decoding run one token at a time?",
             "Each new token depends on the one before it, so the steps cannot run in parallel."),
            ("Why is prefill faster per token than decode?",
             "Prefill runs the whole prompt in one pass, so the matrix multiplies are large and the device stays busy."),
            ("When should tensor parallelism stay inside one node?",
             "It needs an all-reduce in every layer, so it wants the fastest link."),
            ("What does pipeline parallelism cost?",
             "It adds a bubble at the start and the end, and one send per stage boundary."),
            ("Why pad the vocabulary to a multiple of eight?",
             "So the embedding and the LM head split evenly across two, four or eight ranks."),
            ("What does the KV cache trade?",
             "It spends memory to avoid recomputing the keys and values of past tokens."),
        ])
        return f"{name} asks: {q} The answer: {a}"

    def chinese(self) -> str:
        name, n = self.pick(NAMES_ZH), self.pick([2, 4, 8])
        layers = n * self.pick([2, 4])
        kind = self.pick(list(STRATEGIES_ZH))
        s = [f"{name}在{n}张显卡上运行一个有{layers}层的模型。",
             f"{kind}的意思是{STRATEGIES_ZH[kind]}。",
             self.pick([f"第0号进程持有前{layers // n}层，然后把激活值发送给第1号进程。",
                        "KV缓存保存了之前所有词元的键和值，所以解码时每一步只需要计算一个新的词元。",
                        f"路由器把请求{self.r.randint(1, 999)}发送给负载最低的工作节点{self.r.randrange(n)}。",
                        "如果一个工作节点停止发送心跳，路由器会把它的请求重新发送给其他节点。",
                        "张量并行的每一层都需要一次全归约，所以它应该放在同一台机器里。"])]
        return "".join(s)

    def paragraph(self) -> str:
        makers = [self.pipeline_story, self.tensor_parallel, self.data_parallel, self.kv_cache,
                  self.router, self.fault, self.communication, self.memory, self.versions,
                  self.question, self.chinese, self.chinese]
        return self.pick(makers)()


def make_corpus(n_bytes: int = 1_000_000, seed: int = 0) -> str:
    """Paragraphs separated by blank lines, until about ``n_bytes`` UTF-8 bytes."""
    if n_bytes < 1000:
        raise ValueError(f"n_bytes={n_bytes} is too small; ask for at least 1000")
    writer, parts, size = Writer(random.Random(seed)), [], 0
    while size < n_bytes:
        p = writer.paragraph() + "\n\n"
        parts.append(p)
        size += len(p.encode("utf-8"))
    return "".join(parts)


def main() -> None:
    default_out = Path(__file__).resolve().parents[1] / "lessons_lib" / "data" / "corpus.txt"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bytes", type=int, default=1_000_000, help="approximate size in bytes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=default_out)
    args = ap.parse_args()
    text = make_corpus(args.bytes, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {len(text.encode('utf-8'))} bytes, {text.count(chr(10) * 2)} paragraphs to {args.out}")


if __name__ == "__main__":
    main()
