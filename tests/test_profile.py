"""`nitsum-jax profile`: real lanes on host devices timed into a valid profile; merging; the fit."""

import pytest

from nitsum_jax.sim import profile as P
from nitsum_jax.sim.step_model import StepModel


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    from nitsum_jax.cli import main

    path = tmp_path_factory.mktemp("profile") / "cpu.json"
    rc = main(["profile", "--out", str(path), "--num-devices", "2", "--batches", "1,2", "--contexts", "8,24",
               "--prefill-lens", "8,16", "--prefill-contexts", "0,8", "--move-tokens", "16", "--repeats", "2",
               "--commit", "0123abc"])
    assert rc == 0
    return P.load(path)


def test_profile_on_host_devices_measures_every_lane_shape_moves_and_the_switch(measured):
    assert measured["platform"] == "cpu"
    assert set(measured["lanes"]) == {"tp1/c1", "tp1/c2", "tp2/c2"}
    lane = measured["lanes"]["tp2/c2"]
    assert {(r["batch"], r["context"]) for r in lane["decode"]} == {(b, c) for b in (1, 2) for c in (8, 24)}
    assert {(r["tokens"], r["context"]) for r in lane["prefill"]} == {(t, c) for t in (8, 16) for c in (0, 8)}
    assert all(r["ms"] > 0 for r in lane["decode"] + lane["prefill"])
    kinds = {(m["src_tp"], m["dst_tp"], m["shared_device"]) for m in measured["moves"]}
    assert {(1, 2, True), (2, 1, True), (1, 1, False)} <= kinds
    assert measured["switch_ms"]["ms"] > 0
    (source,) = measured["sources"].values()
    assert source["devices"] == 2 and source["date"] and "nitsum-jax profile" in source["how"]
    assert source["commit"] == "0123abc"  # as given (a copied tree's git may name another)


def test_merge_keeps_each_lane_shape_from_its_first_profile_and_every_source(measured):
    other = P.empty_profile(measured["model"], measured["kv_bytes_per_token"], "cpu")
    other["sources"]["elsewhere"] = {"card": "another", "devices": 4, "date": "d", "commit": None, "how": "test"}
    entry = P.lane_entry(other, 4, 4)
    entry["decode"] = [{"batch": 1, "context": 8, "ms": 3.0, "source": "elsewhere"}]
    P.lane_entry(other, 1, 1)["decode"] = [{"batch": 1, "context": 8, "ms": 99.0, "source": "elsewhere"}]
    merged = P.merge([measured, other])
    assert set(merged["lanes"]) == {"tp1/c1", "tp1/c2", "tp2/c2", "tp4/c4"}
    assert merged["lanes"]["tp1/c1"] == measured["lanes"]["tp1/c1"]
    assert set(merged["sources"]) == set(measured["sources"]) | {"elsewhere"}
    wrong = dict(other, model=dict(other["model"], dim=other["model"]["dim"] * 2))
    with pytest.raises(P.ProfileError, match="different model shapes"):
        P.merge([measured, wrong])


def test_profile_rows_must_name_a_known_source(measured):
    bad = {**measured, "sources": {}}
    with pytest.raises(P.ProfileError, match="source .* is not in sources"):
        P.validate(bad)


def test_step_model_reproduces_the_grid_holds_edges_and_reports_held_out_error(measured):
    model = StepModel(measured)
    lane = model.lane(2, 2)
    for row in measured["lanes"]["tp2/c2"]["decode"]:
        assert lane.decode_ms(row["batch"], row["context"]) == pytest.approx(row["ms"])
    edge = [r["ms"] for r in measured["lanes"]["tp2/c2"]["decode"] if r["batch"] == 2 and r["context"] == 24][0]
    assert lane.decode_ms(64, 10_000) == pytest.approx(edge)  # held at the measured edge, not extrapolated
    errors = model.held_out_error()
    assert errors["tp2/c2 decode"]["points"] == 0  # two points per axis: nothing interior to hold out
    assert model.lane(1, 4) is model.lanes["tp1/c2"] and model.fallbacks == {"tp1/c4": "tp1/c2"}


def test_held_out_error_is_measured_on_interior_points():
    from test_sim import tiny_profile

    model = StepModel(tiny_profile())
    err = model.held_out_error()["tp1/c4 decode"]
    assert err["points"] == 2 * 2  # batches 2 and 4 at each of two contexts
    assert err["max_rel"] == pytest.approx(0.0, abs=1e-9)  # the fixture is linear in batch: exact
