"""`bench --baselines best-static`: every static partition is its own real engine on the same workload."""

from nitsum_jax.bench import run_bench
from nitsum_jax.plans import BucketGrid


def test_bench_runs_every_static_partition_and_names_the_best_of_each_figure(tmp_path):
    results = run_bench(configs=["adaptive"], rates=[20.0], num_requests=16, prompt_len="8-24", output_len="4-12",
                        num_devices=2, grid=BucketGrid(decode_batch=(4,), prefill_len=(16,), max_seq_len=64,
                                                       min_move_pages=8),
                        num_pages=32, page_size=8, progress=False, switch_probe=False, baselines="best-static",
                        out_dir=tmp_path)
    assert set(results["configs"]) == {"adaptive", "static-tp2", "static-tp1x2", "dedicated-tp1-tp1x2"}
    assert all(c["sent"] == 16 and c["completed"] == 16 for c in results["configs"].values())
    assert results["configs"]["static-tp1x2"]["backend"]["plans"].startswith("static-tp1x2: all=tp1@0, all=tp1@1")
    row = results["best_static"]["rates"][0]["figures"]["throughput_rps"]
    statics = ("static-tp2", "static-tp1x2", "dedicated-tp1-tp1x2")
    assert row["best_static_name"] in statics
    assert row["best_static"] == max(results["configs"][n]["throughput_rps"] for n in statics)
