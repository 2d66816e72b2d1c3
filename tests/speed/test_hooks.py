"""The one mechanism for wrapping UNet calls (t2i.speed.hooks): wrappers nest in a fixed order, and every one
is undone when its block ends, by return or by exception, leaving the module's class and `__dict__` as they were."""

from __future__ import annotations

import contextlib

import pytest
import torch

from t2i import speed
from t2i.pipelines.unet_calls import autoguided_unet, per_image_unet
from t2i.settings import Settings
from t2i.speed import SpeedOptions
from t2i.speed.hooks import ORDER, hook_names, hooked


class _Net(torch.nn.Module):
    def forward(self, sample, timestep=None, encoder_hidden_states=None, added_cond_kwargs=None, return_dict=True):
        return (sample + 1,)


def logging_wrap(name: str, calls: list):
    def wrap(forward):
        def logged(*args, **kwargs):
            calls.append(name)
            return forward(*args, **kwargs)
        return logged
    return wrap


def snapshot(module: torch.nn.Module) -> tuple:
    """What a wrapper could leave behind: the class, the instance attributes, any instance `forward` inside."""
    return (type(module), {k: id(v) for k, v in module.__dict__.items()},
            [name for name, m in module.named_modules() if "forward" in m.__dict__])


@pytest.mark.parametrize("names", [ORDER, ORDER[::-1], ("bf16", "autoguidance", "compile", "keep_feature",
                                                         "bf16_weights", "per_image", "feature_cache")])
def test_wrappers_nest_in_the_fixed_order_whatever_order_their_blocks_start(names):
    net, calls = _Net(), []
    before = snapshot(net)
    with contextlib.ExitStack() as stack:
        for name in names:
            stack.enter_context(hooked(net, name, logging_wrap(name, calls)))
        assert hook_names(net) == list(ORDER)
        assert net(torch.zeros(1))[0].item() == 1  # the module's own forward still runs, innermost
    assert calls == list(ORDER)  # outermost first
    assert snapshot(net) == before


def test_a_block_that_ends_out_of_turn_leaves_the_others_in_order():
    net, calls = _Net(), []
    outer, middle, inner = (hooked(net, n, logging_wrap(n, calls)) for n in ("autoguidance", "per_image", "bf16"))
    for block in (inner, outer, middle):
        block.__enter__()
    middle.__exit__(None, None, None)
    net(torch.zeros(1))
    assert calls == ["autoguidance", "bf16"]
    outer.__exit__(None, None, None)
    inner.__exit__(None, None, None)
    assert hook_names(net) == [] and "forward" not in net.__dict__


def test_an_instance_forward_already_there_is_wrapped_and_put_back():
    net, calls = _Net(), []
    theirs = net.forward = lambda sample, *a, **k: (sample * 2,)  # e.g. accelerate's offload hook
    with hooked(net, "bf16", logging_wrap("bf16", calls)):
        assert net(torch.ones(1))[0].item() == 2 and calls == ["bf16"]
    assert net.__dict__["forward"] is theirs


def test_an_unknown_or_doubled_wrapper_is_refused_and_changes_nothing():
    net = _Net()
    before = snapshot(net)
    with pytest.raises(ValueError, match="unknown hook 'turbo'"):
        with hooked(net, "turbo", lambda f: f):
            pass
    with hooked(net, "bf16", lambda f: f):
        with pytest.raises(ValueError, match="'bf16' is already on this _Net"):
            with hooked(net, "bf16", lambda f: f):
                pass
        assert hook_names(net) == ["bf16"]
    assert snapshot(net) == before


def test_a_wrapper_that_fails_to_build_changes_nothing():
    net = _Net()

    def broken(forward):
        raise RuntimeError("cannot wrap")

    with pytest.raises(RuntimeError, match="cannot wrap"):
        with hooked(net, "compile", broken):
            pass
    assert hook_names(net) == [] and "forward" not in net.__dict__


WRAPPERS = {
    "per_image": lambda pipe, guide: per_image_unet(pipe.pipe.unet, 2),
    "autoguidance": lambda pipe, guide: autoguided_unet(
        pipe.pipe.unet, guide, Settings(prompt="p", guidance=5.0, autoguidance=3.0), 2, exact=True),
    "feature_cache": lambda pipe, guide: speed.feature_cache(pipe, 2, layers=1),
    "bf16": lambda pipe, guide: speed.bf16_autocast(pipe),
    "compile": lambda pipe, guide: speed.compiled(pipe, backend="eager"),
    "speed.apply": lambda pipe, guide: speed.apply(pipe, SpeedOptions.parse("compile=eager,bf16,cache2:1")),
}


@pytest.mark.parametrize("name", list(WRAPPERS))
def test_every_wrapper_is_undone_when_its_block_raises(sd_pipe, name):
    unet, guide = sd_pipe.pipe.unet, _Net()
    before, guide_before = snapshot(unet), snapshot(guide)
    with pytest.raises(KeyboardInterrupt):
        with WRAPPERS[name](sd_pipe, guide):
            assert hook_names(unet) and "forward" in unet.__dict__
            raise KeyboardInterrupt  # what Ctrl-C raises in the middle of a call
    assert snapshot(unet) == before and snapshot(guide) == guide_before
    assert hook_names(unet) == hook_names(guide) == []


def test_compile_compiles_once_per_process_under_the_other_wrappers(sd_pipe):
    from torch._dynamo.utils import counters

    unet = sd_pipe.pipe.unet
    sample = torch.randn(2, unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    graphs = []
    for _ in range(2):  # each block makes its bf16 wrapper anew; the compiled forward inside is the same one
        with speed.apply(sd_pipe, SpeedOptions.parse("compile=eager,bf16")), torch.no_grad():
            unet(sample, 500, context)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[0]
