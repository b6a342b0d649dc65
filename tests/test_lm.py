"""The example language model run as a user would (issue 10, item 5): data-parallel scoring with
``map`` over a resident whole-model service, model-parallel with each block a resident stage
chained by ``pipeline_map``, and greedy generation streamed token by token; each checked against
the model in one process (logits to 1e-5, the same greedy tokens)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ndpipe.examples import lm
from tests.conftest import STEADY

pytestmark = pytest.mark.timeout(180)


def test_the_model_gives_the_same_logits_data_parallel_and_model_parallel(make_cluster, tmp_short: Path) -> None:  # type: ignore[no-untyped-def]
    weights = lm.make_weights(str(tmp_short / "lm.npz"), vocab=128, width=64, blocks=3, heads=4)
    c = make_cluster(broker=STEADY, services=lm.services(weights))
    c.start_broker()
    c.start_worker(processes=2)
    batches = [np.random.default_rng(i).integers(0, 128, (4, 16)) for i in range(12)]
    expected = [lm.forward(weights, b) for b in batches]
    with c.master() as m:
        c.wait_slots(m, 2, service="block0")
        data_parallel = list(m.map("lm", batches, chunksize=1))
        model_parallel = list(m.pipeline_map(lm.stages(weights), batches))
        streamed = list(m.stream("generate", batches[0][0], max_new_tokens=12))
    assert streamed == lm.generate(weights, batches[0][0], 12)  # the same greedy tokens, one by one
    for want, a, b in zip(expected, data_parallel, model_parallel, strict=True):
        np.testing.assert_allclose(a, want, rtol=0, atol=1e-5)
        np.testing.assert_allclose(b, want, rtol=0, atol=1e-5)
        assert np.array_equal(a[:, -1].argmax(-1), want[:, -1].argmax(-1))  # the same greedy next tokens
        assert np.array_equal(b[:, -1].argmax(-1), want[:, -1].argmax(-1))


def test_a_block_asked_for_a_layer_the_weights_lack_is_unavailable_not_a_crash_loop(  # type: ignore[no-untyped-def]
        make_cluster, tmp_short: Path) -> None:
    from ndpipe.errors import ServiceUnavailable

    weights = lm.make_weights(str(tmp_short / "lm.npz"), vocab=64, width=32, blocks=1, heads=2)
    c = make_cluster(broker=STEADY, services={
        "block7": {"handler": "ndpipe.examples.lm:Block", "init": {"weights": weights, "layer": 7}}})
    c.start_broker()
    c.start_worker(processes=1)
    with c.master() as m:
        c.wait_slots(m, 1)
        with pytest.raises(ServiceUnavailable, match="has no block 7"):
            m.call("block7", (np.zeros((1, 2, 32)),)).result(30)
