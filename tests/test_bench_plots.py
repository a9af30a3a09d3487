"""The bench plots read as they should: axes from zero, titles, labelled SLO lines, a legend that
covers no data (drawn with the Agg canvas, checked on the Axes, not by looking at pixels)."""

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from nitsum_jax.bench.plots import plot_latency_cdf, plot_plan_timeline, plot_rate_sweep, save_plots  # noqa: E402


def record(config, cls, sent, ttft, n=8, tpot=0.02):
    return {"config": config, "rate_index": 0, "priority_class": cls, "scheduled_s": sent, "sent_s": sent,
            "first_token_s": sent + ttft, "finish_s": sent + ttft + tpot * (n - 1), "output_tokens": n,
            "status": "completed"}


@pytest.fixture
def results():
    """One rate, two configurations whose throughput differs by 0.4%."""
    configs = {}
    for name, throughput, history in (("static", 10.00, [(0.0, "static")]),
                                      ("adaptive", 10.04, [(0.0, "mixed"), (3.0, "spare"), (6.0, "mixed")])):
        configs[name] = {"by_rate": [{"rate_rps": 12.0, "throughput_rps": throughput,
                                      "goodput_rps": throughput - 1}],
                         "plan_history": history, "span_s": 10.0}
    requests = [record(c, cls, t * 0.5, 0.05 + 0.01 * (t % 7)) for c in configs for cls in ("high", "low")
                for t in range(20)]
    return {"configs": configs, "requests": requests, "headline_rate_index": 0, "headline_rate_rps": 12.0,
            "slo": {"high": {"ttft_target_s": 0.1, "tpot_target_s": 0.05},
                    "low": {"ttft_target_s": 1.0, "tpot_target_s": 0.2}}}


def axes():
    fig = Figure(figsize=(10, 3.5))
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def test_rate_sweep_starts_at_zero_and_has_a_title(results):
    _, ax = axes()
    plot_rate_sweep(ax, results)
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] > 10.04
    assert ax.get_title()


def test_latency_cdf_labels_each_slo_line(results):
    _, ax = axes()
    plot_latency_cdf(ax, results, "ttft")
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "high TTFT target 0.1 s" in legend and "low TTFT target 1 s" in legend


def test_plan_timeline_legend_covers_no_line(results):
    fig, ax = axes()
    plot_plan_timeline(ax, results)
    fig.tight_layout()
    fig.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    assert not legend.overlaps(ax.get_window_extent())
    assert ax.get_title()


def test_save_plots_writes_the_three_pngs(results, tmp_path):
    assert sorted(save_plots(results, tmp_path)) == ["latency_cdf.png", "plan_timeline.png",
                                                     "throughput_goodput_vs_rate.png"]
    assert all((tmp_path / name).stat().st_size > 1000 for name in ("latency_cdf.png", "plan_timeline.png"))
