"""A layer's CUDA work across streams (lora_ext.streams.StreamOrder): writes wait for every stream that used
the layer, reads wait for the last write, dropped storage is recorded on the streams that used it.

The ordering rules are checked on the CPU with stand-in streams that record what they were asked to wait
for; the GPU test checks the effect with a forward delayed on one stream and a switch on another."""
import threading

import pytest
import torch

import lora_ext
from lora_ext.streams import StreamOrder

CUDA = torch.device("cuda", 0)


class FakeStream:
    def __init__(self, sid):
        self.cuda_stream = sid
        self.waited = []

    def wait_stream(self, other):
        self.waited.append(other.cuda_stream)


class FakeTensor:
    is_cuda = True

    def __init__(self):
        self.recorded = []

    def record_stream(self, stream):
        self.recorded.append(stream.cuda_stream)


@pytest.fixture
def streams(monkeypatch):
    """Stand-in streams 1 and 2; `use(s)` makes one current."""
    made = {1: FakeStream(1), 2: FakeStream(2)}
    current = {"s": made[1]}
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current["s"])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)

    def use(sid):
        current["s"] = made[sid]
        return made[sid]
    return use


def test_a_write_waits_for_every_reader_and_a_read_for_the_last_write(streams):
    order = StreamOrder()
    s1 = streams(1)
    order.read(CUDA)
    s2 = streams(2)
    order.write(CUDA)
    assert s2.waited == [1]  # the switch on stream 2 waits for the forward queued on stream 1
    streams(1)
    order.read(CUDA)
    order.read(CUDA)
    assert s1.waited == [2]  # the next forward on stream 1 waits for the switch, once
    streams(2)
    order.read(CUDA)
    assert s2.waited == [1]  # the writer's own stream needs no wait


def test_dropped_storage_is_recorded_on_every_user(streams):
    order = StreamOrder()
    streams(1)
    order.read(CUDA)
    streams(2)
    order.write(CUDA)
    t = FakeTensor()
    order.retire(t, None)
    assert sorted(t.recorded) == [1, 2]


def test_cpu_work_is_not_ordered(streams):
    order = StreamOrder()
    order.read(torch.device("cpu"))
    order.write(torch.device("cpu"))
    assert order.writer is None and order.users == {}


def test_nothing_waits_inside_a_capture(streams, monkeypatch):
    order = StreamOrder()
    streams(1)
    order.read(CUDA)
    s2 = streams(2)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    order.write(CUDA)
    assert s2.waited == []


def _served_layer(dim, rows, device="cuda"):
    """A merged float32 Linear serving two adapters ("default", "other"), and an input. Its merges are lossless
    (float32 is lossy by default): after any number of switches the weight is bit for bit what one merge of the
    active adapter gives, so every output must match that adapter's, whatever the switches before it, bit for
    bit (lossy float32 switches of these updates, |s B A| about 50 times |W|, stay within a tolerance:
    test_switches_alone_do_not_drift)."""
    torch.manual_seed(0)
    layer = lora_ext.Linear(dim, dim, r=8, lora_alpha=16, lossless=True).to(device).requires_grad_(False)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    layer.add_adapter("other", torch.randn(8, dim).to(device), torch.randn(dim, 8).to(device), 2.0)
    layer.eval()
    return layer, torch.randn(rows, dim, device=device)


def _adapter_outputs(layer, x):
    """Each adapter's output, and the weight each one merged gives (switching back and forth once)."""
    outs, weights = {}, {}
    for name in ("default", "other", "default"):
        layer.set_adapter(name)
        outs[name], weights[name] = layer(x).clone(), layer.weight.detach().clone()
    return outs, weights


def _matches(y, outs):
    """Whether y is one adapter's output: a torn forward (a weight half switched) is off by about the
    adapters' difference, 1e2 here, against 1e-5 of |y| allowed for the GEMM's own run-to-run variation."""
    return any(torch.allclose(y, o, rtol=0, atol=1e-5 * o.abs().max().item()) for o in outs.values())


def test_switches_alone_do_not_drift():
    """The premise of the thread test below, on the CPU with no thread: 200 lossless switches leave each
    adapter's weight bit for bit as it was and its output matching; lossy ones stay within the tolerance too (a
    switch back rounds as the negation of the switch there: ops._swap_order; they drifted past it within a few
    round trips before, which the thread test would have reported as tearing)."""
    layer, x = _served_layer(512, 16, device="cpu")
    outs, weights = _adapter_outputs(layer, x)
    for i in range(200):
        name = ("other", "default")[i % 2]
        layer.set_adapter(name)
        assert torch.equal(layer.weight, weights[name]), f"switch {i}"
        assert _matches(layer(x), outs), f"switch {i}"
    lossy, x = _served_layer(512, 16, device="cpu")
    lossy.lossless = False
    lossy.train()
    lossy.eval()
    outs, _ = _adapter_outputs(lossy, x)
    drifted = 0
    for i in range(200):
        lossy.set_adapter(("other", "default")[i % 2])
        drifted += not _matches(lossy(x), outs)
    assert drifted == 0, drifted


@pytest.mark.gpu
@pytest.mark.hardware
def test_switch_on_another_stream_waits_for_a_queued_forward():
    """A forward queued behind a long sleep on stream 1, then a switch on stream 2 with no host sync: the
    forward must still see the adapter that was active when it was called."""
    layer, x = _served_layer(256, 4)
    want = layer(x).clone()
    torch.cuda.synchronize()
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    with torch.cuda.stream(s1):
        torch.cuda._sleep(200_000_000)  # about 0.1 s of GPU time before the forward reads W
        y = layer(x)
    with torch.cuda.stream(s2):
        layer.set_adapter("other")
    torch.cuda.synchronize()
    assert torch.equal(y, want)


@pytest.mark.gpu
@pytest.mark.hardware
def test_threads_on_two_streams_switching_while_forwarding():
    layer, x = _served_layer(512, 16)
    outs, weights = _adapter_outputs(layer, x)
    torch.cuda.synchronize()
    results, stop = [], threading.Event()

    def forward():
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            while not stop.is_set() and len(results) < 5000:  # (bounded: the check below costs a sync each)
                results.append(layer(x))
        s.synchronize()

    def switch():
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            for i in range(200):
                layer.set_adapter(("other", "default")[i % 2])
        s.synchronize()
        stop.set()

    threads = [threading.Thread(target=forward), threading.Thread(target=switch)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a thread did not finish in 120 s"
    torch.cuda.synchronize()
    assert results
    assert torch.equal(layer.weight, weights[layer.active_adapter])  # 200 switches, no drift
    torn = [y for y in results if not _matches(y, outs)]
    assert not torn, f"{len(torn)} of {len(results)} outputs match no adapter"
