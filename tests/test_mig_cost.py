"""MIG judged and priced (issue 25): an endpoint serving on MIG instances, the instance's
health, its share of the GPU-hour, tokens per dollar per instance-endpoint, calibrate on a MIG
GPU. In-process, from GpuReadings that carry MigInstance tuples."""
from __future__ import annotations

import pytest

from gpucostd import config as cfgmod
from gpucostd.config import ConfigError


def cfg(text=""):
    return cfgmod.parse(text, None)


# --------------------------------------------------------------------------- config
def test_an_endpoint_serves_on_mig_instances_and_its_tokens_go_to_their_gpus():
    c = cfg('[[inference.endpoint]]\nurl = "http://127.0.0.1:8001/metrics"\n'
            'instances = ["0/1/0", "0/02/0"]\n'
            '[[inference.endpoint]]\nurl = "http://127.0.0.1:8002/metrics"\n'
            'instances = ["0/3/0"]\n'
            '[[inference.endpoint]]\nurl = "http://127.0.0.1:8003/metrics"\ngpus = [1]\n')
    a, b, whole = c.inference_endpoints
    assert a.instances == ("0/1/0", "0/2/0") and a.gpus is None and a.serving_gpus == (0,)
    assert b.instances == ("0/3/0",) and b.serving_gpus == (0,)
    assert whole.instances is None and whole.serving_gpus == (1,)
    # written back as it was given
    again = cfg(c.to_toml())
    assert [e.instances for e in again.inference_endpoints] == [a.instances, b.instances, None]


@pytest.mark.parametrize("body, line, words", [
    ('instances = ["0/1"]', 4, "is not an instance"),
    ('instances = []', 4, "non-empty list"),
    ('instances = "0/1/0"', 4, "non-empty list"),
    ('instances = ["0/1/0", "0/1/0"]', 4, "named twice"),
    ('gpus = [0]\ninstances = ["0/1/0"]', 5, "GPU 0 is named twice"),
])
def test_a_bad_instances_list_says_what_where_and_how(body, line, words):
    text = f'# mig\n[[inference.endpoint]]\nurl = "http://127.0.0.1:8001/metrics"\n{body}\n'
    with pytest.raises(ConfigError) as e:
        cfgmod.parse(text, "/etc/gpucostd/gpucostd.toml")
    msg = str(e.value)
    assert msg.startswith(f"/etc/gpucostd/gpucostd.toml:{line}: ") and words in msg
    assert "GPU/GI/CI" in msg or "drop 0 from gpus" in msg


def test_a_gpu_is_either_whole_or_sliced_across_endpoints_and_an_instance_has_one_endpoint():
    two = ('[[inference.endpoint]]\nurl = "http://127.0.0.1:8001/metrics"\n{a}\n'
           '[[inference.endpoint]]\nurl = "http://127.0.0.1:8002/metrics"\n{b}\n')
    with pytest.raises(ConfigError, match=r"GPU 0 is sliced by MIG.*instances = "):
        cfg(two.format(a='instances = ["0/1/0"]', b="gpus = [0]"))
    with pytest.raises(ConfigError, match=r"0/1/0 is on GPU 0, which .* #1 serves on whole"):
        cfg(two.format(a="gpus = [0, 1]", b='instances = ["0/1/0"]'))
    with pytest.raises(ConfigError, match=r"0/1/0 is already in \[\[inference.endpoint\]\] #1"):
        cfg(two.format(a='instances = ["0/1/0"]', b='instances = ["0/1/0"]'))
    # two endpoints on two instances of one GPU, and a whole GPU beside them: fine
    cfg(two.format(a='instances = ["0/1/0"]\ngpus = [1]', b='instances = ["0/2/0"]'))
