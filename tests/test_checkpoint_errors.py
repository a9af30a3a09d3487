"""Checkpoint conversion and loading: every bad input is a `CheckpointError` that names the
file, the tensor or key and what was expected, and a failed conversion leaves nothing behind.
Also sharded Hugging Face sources and the `nitsum-ckpt` command line."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from checkpoints_tools.hf import convert_hf
from checkpoints_tools.store import (CheckpointError, describe, expected_arrays, load_params, read_config,
                                     stored_arrays)
from hf_models import make_hf_llama
from nitsum_jax.config import preset
from nitsum_jax.model import param_count

REPO = Path(__file__).resolve().parents[1]
UP_PROJ = "model.layers.0.mlp.up_proj.weight"
DIM, FFN = 64, 160  # make_hf_llama's hidden_size and intermediate_size


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """(folder, torch model): a one-layer random HF Llama saved with save_pretrained."""
    src = tmp_path_factory.mktemp("hf") / "llama"
    model = make_hf_llama(src, tie=False, seed=0, num_layers=1)
    assert (src / "model.safetensors").is_file()
    return src, model


@pytest.fixture(scope="module")
def converted(hf_model, tmp_path_factory):
    """The unsharded source converted once: the reference checkpoint."""
    dst = tmp_path_factory.mktemp("ref") / "ckpt"
    cfg = convert_hf(hf_model[0], dst, progress=False)
    return dst, cfg


@pytest.fixture
def src(hf_model, tmp_path) -> Path:
    """A private copy of the HF folder that a test may damage."""
    return Path(shutil.copytree(hf_model[0], tmp_path / "src"))


@pytest.fixture
def dst(tmp_path) -> Path:
    return tmp_path / "out"


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def assert_nothing_written(dst: Path) -> None:
    assert not dst.exists(), f"{dst} was created by a failed conversion"
    leftovers = sorted(p.name for p in dst.parent.glob(f".{dst.name}.partial-*"))
    assert leftovers == [], f"temporary folders left behind: {leftovers}"


def convert_error(src: Path, dst: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        convert_hf(src, dst, progress=False)
    return str(info.value)


# --- conversion errors ---------------------------------------------------------------------

def test_missing_source_folder_is_named(tmp_path, dst):
    missing = tmp_path / "no-such-model"

    msg = convert_error(missing, dst)

    assert str(missing) in msg and "not found" in msg
    assert_nothing_written(dst)


def test_missing_config_json_is_named(src, dst):
    (src / "config.json").unlink()

    msg = convert_error(src, dst)

    assert str(src / "config.json") in msg and "not found" in msg
    assert_nothing_written(dst)


def test_unsupported_architecture_names_config_json_and_the_expected_architecture(src, dst):
    edit_json(src / "config.json", model_type="mistral", architectures=["MistralForCausalLM"])

    msg = convert_error(src, dst)

    assert "config.json" in msg
    assert "'mistral'" in msg and "MistralForCausalLM" in msg
    assert "LlamaForCausalLM" in msg and "'llama'" in msg
    assert_nothing_written(dst)


def test_tensor_with_the_wrong_shape_names_file_tensor_and_both_shapes(src, dst):
    tensors = load_file(src / "model.safetensors")
    assert tensors[UP_PROJ].shape == (FFN, DIM)
    tensors[UP_PROJ] = np.ascontiguousarray(tensors[UP_PROJ].T)  # a transposed export
    save_file(tensors, src / "model.safetensors")

    msg = convert_error(src, dst)

    assert str(src / "model.safetensors") in msg
    assert repr(UP_PROJ) in msg
    assert f"has shape {(DIM, FFN)}" in msg
    assert f"expected {(FFN, DIM)}" in msg
    assert_nothing_written(dst)


def test_missing_tensor_is_named_with_the_files_searched(src, dst):
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.0.mlp.down_proj.weight"]
    save_file(tensors, src / "model.safetensors")

    msg = convert_error(src, dst)

    assert "'model.layers.0.mlp.down_proj.weight'" in msg and "not found" in msg
    assert "model.safetensors" in msg
    assert_nothing_written(dst)


def test_tokenizer_larger_than_vocab_size_names_tokenizer_json_and_both_sizes(src, dst):
    # The tokenizer is checked before any tensor, so only config.json needs to change.
    edit_json(src / "config.json", vocab_size=100)

    msg = convert_error(src, dst)

    assert str(src / "tokenizer.json") in msg
    assert "264 tokens" in msg
    assert "vocab_size is 100" in msg
    assert_nothing_written(dst)


def test_non_empty_destination_is_refused_and_left_as_it_was(src, dst):
    dst.mkdir()
    (dst / "notes.txt").write_text("keep me")

    msg = convert_error(src, dst)

    assert str(dst) in msg and "not empty" in msg
    assert sorted(p.name for p in dst.iterdir()) == ["notes.txt"]
    assert (dst / "notes.txt").read_text() == "keep me"
    assert list(dst.parent.glob(f".{dst.name}.partial-*")) == []


def test_empty_existing_destination_is_accepted(src, dst):
    dst.mkdir()

    convert_hf(src, dst, progress=False)

    assert (dst / "nitsum_config.json").is_file()
    assert list(dst.parent.glob(f".{dst.name}.partial-*")) == []


def test_failure_while_writing_removes_the_temporary_folder(src, dst, monkeypatch):
    import checkpoints_tools.store as store

    class BrokenCheckpointer:
        def save(self, path, params):
            assert Path(path).parent.name.startswith(f".{dst.name}.partial-")
            raise OSError("disk full")

    monkeypatch.setattr(store.ocp, "StandardCheckpointer", BrokenCheckpointer)

    with pytest.raises(OSError, match="disk full"):
        convert_hf(src, dst, progress=False)

    assert_nothing_written(dst)


# --- sharded sources -----------------------------------------------------------------------

SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def shard(src: Path) -> dict[str, str]:
    """Split model.safetensors into two files plus an index, like save_pretrained does."""
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    weight_map = {name: SHARDS[0] if name.startswith("model.layers.") else SHARDS[1] for name in names}
    for fname in SHARDS:
        save_file({n: tensors[n] for n in names if weight_map[n] == fname}, src / fname)
    total = sum(t.nbytes for t in tensors.values())
    (src / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (src / "model.safetensors").unlink()
    return weight_map


def test_sharded_checkpoint_converts_to_the_same_arrays_as_unsharded(src, dst, converted):
    import jax

    weight_map = shard(src)
    assert set(weight_map.values()) == set(SHARDS)

    cfg = convert_hf(src, dst, progress=False)

    ref_dir, ref_cfg = converted
    assert cfg == ref_cfg
    sharded = load_params(dst, cfg)
    unsharded = load_params(ref_dir, ref_cfg)
    flat_a = jax.tree_util.tree_flatten_with_path(sharded)[0]
    flat_b = jax.tree_util.tree_flatten_with_path(unsharded)[0]
    assert [k for k, _ in flat_a] == [k for k, _ in flat_b]
    assert len(flat_a) >= 12  # embed, lm_head, final norm and 9 per-layer weights at least
    for (path, a), (_, b) in zip(flat_a, flat_b):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def test_index_naming_a_missing_shard_names_that_file(src, dst):
    shard(src)
    (src / SHARDS[1]).unlink()

    msg = convert_error(src, dst)

    assert str(src / SHARDS[1]) in msg
    assert "model.safetensors.index.json" in msg and "not found" in msg
    assert_nothing_written(dst)


def test_index_without_a_weight_map_is_refused(src, dst):
    shard(src)
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))

    msg = convert_error(src, dst)

    assert "model.safetensors.index.json" in msg and "weight_map" in msg
    assert_nothing_written(dst)


def test_folder_without_safetensors_is_refused(src, dst):
    (src / "model.safetensors").unlink()

    msg = convert_error(src, dst)

    assert "no *.safetensors" in msg and str(src) in msg
    assert_nothing_written(dst)


# --- loader errors -------------------------------------------------------------------------

def test_read_config_on_a_folder_that_is_not_a_checkpoint_names_nitsum_config_json(hf_model):
    with pytest.raises(CheckpointError) as info:
        read_config(hf_model[0])  # a HF folder, not ours

    assert str(hf_model[0] / "nitsum_config.json") in str(info.value)
    assert "not found" in str(info.value)


def test_read_config_on_a_missing_folder_names_it(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        read_config(tmp_path / "nothing-here")


def copy_checkpoint(converted, tmp_path) -> Path:
    return Path(shutil.copytree(converted[0], tmp_path / "ckpt"))


def assert_names_a_mismatched_array(msg: str, ckpt: Path, cfg) -> None:
    """The message names one array whose stored shape differs from the config's, with both shapes."""
    stored, expected = stored_arrays(ckpt), expected_arrays(cfg)
    mismatched = {name: (stored[name][0], shape) for name, shape in expected.items()
                  if name in stored and stored[name][0] != shape}
    assert mismatched, "the edit should have made some array disagree"
    named = [name for name in mismatched if repr(name) in msg]
    assert named, f"no mismatched array {sorted(mismatched)} named in: {msg}"
    have, want = mismatched[named[0]]
    assert f"has shape {have}" in msg and f"expected {want}" in msg
    assert "nitsum_config.json" in msg


@pytest.mark.parametrize("change,old,new", [("num_layers", 1, 2), ("dim", DIM, 96)])
def test_load_params_names_the_array_and_both_shapes_when_the_config_disagrees(converted, tmp_path,
                                                                                change, old, new):
    ckpt = copy_checkpoint(converted, tmp_path)
    assert json.loads((ckpt / "nitsum_config.json").read_text())[change] == old
    edit_json(ckpt / "nitsum_config.json", **{change: new})
    cfg = read_config(ckpt)

    with pytest.raises(CheckpointError) as info:
        load_params(ckpt, cfg)

    assert_names_a_mismatched_array(str(info.value), ckpt, cfg)


def test_load_params_refuses_an_untied_checkpoint_read_as_tied(converted, tmp_path):
    ckpt = copy_checkpoint(converted, tmp_path)
    edit_json(ckpt / "nitsum_config.json", tie_embeddings=True)

    with pytest.raises(CheckpointError, match=r"unexpected arrays \[.*lm_head.*\].*tie_embeddings=True"):
        load_params(ckpt, read_config(ckpt))


def test_malformed_nitsum_config_json_is_named(converted, tmp_path):
    ckpt = copy_checkpoint(converted, tmp_path)
    edit_json(ckpt / "nitsum_config.json", hidden_size=64)  # a HF key, unknown to us

    with pytest.raises(CheckpointError) as info:
        read_config(ckpt)

    assert "nitsum_config.json" in str(info.value) and "hidden_size" in str(info.value)


# --- nitsum-ckpt command line --------------------------------------------------------------

def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "checkpoints_tools.cli", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def cli_converted(hf_model, tmp_path_factory):
    dst = tmp_path_factory.mktemp("cli") / "ckpt"
    result = cli("convert-hf", hf_model[0], dst, "--quiet")
    assert result.returncode == 0, result.stderr
    assert f"wrote {dst}" in result.stdout
    return dst


def test_cli_inspect_prints_the_parameter_count_of_the_torch_model_and_float32(cli_converted, hf_model):
    expected = sum(p.numel() for p in hf_model[1].parameters())

    result = cli("inspect", cli_converted)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"parameters  {expected:,}" in lines
    assert any(line.split() == ["dtype", "float32"] for line in lines)
    assert "dtypes      float32" in lines
    assert any(line.split() == ["num_layers", "1"] for line in lines)


def test_cli_inspect_json_is_parseable_and_matches_the_model(cli_converted, hf_model):
    result = cli("inspect", cli_converted, "--json")

    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["parameters"] == sum(p.numel() for p in hf_model[1].parameters())
    assert info["dtypes"] == ["float32"]
    assert info["config"]["dim"] == DIM and info["config"]["num_layers"] == 1
    assert {a["dtype"] for a in info["arrays"].values()} == {"float32"}
    assert sum(int(np.prod(a["shape"])) for a in info["arrays"].values()) == info["parameters"]
    assert info["bytes"] == 4 * info["parameters"]
    assert info["tokenizer"] is True
    assert info == json.loads(json.dumps(describe(cli_converted)))


def test_cli_failing_convert_exits_2_with_an_error_line_on_stderr(tmp_path):
    missing, dst = tmp_path / "missing-src", tmp_path / "out"

    result = cli("convert-hf", missing, dst, "--quiet")

    assert result.returncode == 2
    assert result.stderr.startswith("nitsum-ckpt: error:")
    assert str(missing) in result.stderr
    assert "Traceback" not in result.stderr
    assert_nothing_written(dst)


def test_cli_init_makes_a_checkpoint_that_inspect_reads(tmp_path):
    dst = tmp_path / "tiny"

    made = cli("init", "--preset", "tiny", dst, "--seed", "3")
    shown = cli("inspect", dst, "--json")

    assert made.returncode == 0, made.stderr
    assert "seed 3" in made.stdout
    assert "drawing random weights of preset tiny" in made.stderr and f"wrote {dst} in" in made.stderr  # progress
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    assert info["parameters"] == param_count(preset("tiny"))
    assert info["config"] == preset("tiny").to_dict()
    assert info["tokenizer"] is True


def test_cli_convert_of_a_damaged_safetensors_file_is_one_error_line_naming_it(src, dst):
    shard = src / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:200])  # cut short: the header says more than is there

    result = cli("convert-hf", src, dst, "--quiet")

    assert result.returncode == 2
    assert result.stderr.startswith("nitsum-ckpt: error:") and len(result.stderr.strip().splitlines()) == 1
    assert str(shard) in result.stderr and "safetensors" in result.stderr
    assert "Traceback" not in result.stderr
    assert_nothing_written(dst)


def test_unused_tensors_are_refused_by_name_or_left_out_with_a_warning(src, dst, caplog):
    shard = src / "model.safetensors"
    tensors = load_file(shard)
    tensors["model.layers.0.mlp.extra_proj.weight"] = np.zeros((2, 2), np.float32)
    save_file(tensors, shard)

    error = convert_error(src, dst)
    assert "model.layers.0.mlp.extra_proj.weight" in error
    assert "--allow-unused" in error
    assert_nothing_written(dst)
    with caplog.at_level("WARNING", logger="checkpoints_tools"):
        convert_hf(src, dst, progress=False, allow_unused=True)
    assert "model.layers.0.mlp.extra_proj.weight" in caplog.text and "left out" in caplog.text


def test_an_lm_head_in_a_tied_checkpoint_is_named(src, dst):
    edit_json(src / "config.json", tie_word_embeddings=True)

    error = convert_error(src, dst)

    assert "lm_head.weight" in error and "tie_word_embeddings" in error


def test_a_converted_folder_gets_the_usual_mode_not_private(converted):
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(converted[0].stat().st_mode) == 0o777 & ~umask
