"""Orbax restore straight into the shardings a lane asks for."""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from checkpoints_tools.store import load_params, write_checkpoint
from nitsum_jax.model import param_specs


def test_restore_lands_each_array_in_the_requested_sharding(tmp_path, tiny_cfg, tiny_params):
    write_checkpoint(tmp_path / "ckpt", tiny_cfg, tiny_params)
    mesh = Mesh(np.array(jax.devices()[:4]), ("tp",))
    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(tiny_cfg))
    restored = load_params(tmp_path / "ckpt", tiny_cfg, shardings)
    wq = restored.chunks[0].wq
    assert wq.sharding == NamedSharding(mesh, param_specs(tiny_cfg).chunks[0].wq)
    assert [s.data.shape[2] for s in wq.addressable_shards] == [tiny_cfg.num_heads // 4] * 4
    assert {s.device for s in wq.addressable_shards} == set(jax.devices()[:4])
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(tiny_params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
