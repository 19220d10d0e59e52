"""Visualisers: each picture is a pure function of plain data (testable without a browser),
wrapped in ipywidgets for the notebooks. Import the submodule you need."""


def redraw(output, draw, *, figsize) -> None:
    """Replace what an ipywidgets ``Output`` shows with a new figure drawn by ``draw(ax)``.

    The figure is closed after showing, so a slider dragged a hundred times leaves no figures open.
    """
    import matplotlib.pyplot as plt

    with output:
        output.clear_output(wait=True)
        fig, ax = plt.subplots(figsize=figsize)
        draw(ax)
        plt.show()
        plt.close(fig)
