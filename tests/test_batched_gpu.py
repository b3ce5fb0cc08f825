"""Mixed batches on CUDA: adapters paged in from host memory, a CUDA graph captured inside batch_adapters
replayed with the next batch's rows and slots (no re-capture), and two threads on two streams. The tests not
marked hardware also run in the CPU rehearsal (--sim-as-cuda: the simulator's kernels)."""
import threading

import pytest
import torch

import lora_ext as lora
from helpers import TOL, rel_err
from test_batched import RANKS, SCALES, base_of, make_input, oracle


def cuda_layer(cuda, dtype=torch.float32, host_adapters=True):
    """A Linear on the device whose inactive adapters wait in host memory (when host_adapters)."""
    layer = lora.Linear(24, 20, r=4)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    layer = layer.to(cuda.device, dtype).eval()
    for name, r in RANKS.items():
        a_shape, b_shape = layer.factor_shapes(r)
        A, B = torch.randn(a_shape) * 0.3, torch.randn(b_shape) * 0.3
        if not host_adapters:
            A, B = A.to(cuda.device), B.to(cuda.device)
        layer.add_adapter(name, A.to(dtype), B.to(dtype), SCALES[name])
    layer.unmerge()
    return layer


def check(layer, x, names, got, dtype=torch.float32):
    """Each row against the float64 oracle, on a CPU copy of the layer (the layer itself stays where it is)."""
    cpu = _cpu_copy(layer)
    ref = oracle(cpu, x.cpu(), names, base_of(cpu))
    for i in range(len(names)):
        assert rel_err(got[i], ref[i]) < TOL[dtype], f"row {i} ({names[i]})"


def _cpu_copy(layer):
    import copy
    cpu = copy.deepcopy(layer).cpu()
    for name in list(cpu._adapters):  # deepcopy keeps inactive adapters where they were: bring them over
        A, B, s = cpu._adapters[name]
        cpu._adapters[name] = (A.cpu(), B.cpu(), s)
    return cpu


def captured(fn):
    """(a CUDA graph of fn(), its output): captured inside the open batch after a warm-up on a side stream, which makes
    the index buffers of this thread and batch size."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@pytest.mark.gpu
def test_adapters_paged_in_from_host_memory(cuda):
    layer = cuda_layer(cuda)
    lora.configure_slots(layer, slots=2, max_rank=5)
    x = make_input("linear", (4,)).to(cuda.device)
    with torch.no_grad():
        for names in (["a", "b", None, "a"], ["c", "c", "a", None], ["b", None, "b", "c"], ["a", "default", "a", None]):
            with lora.batch_adapters(layer, names):
                got = layer(x)
            cuda.synchronize()
            check(layer, x, names, got)


@pytest.mark.gpu
@pytest.mark.hardware("CUDA graph capture and replay")
def test_a_graph_captured_in_a_batch_replays_the_next_batch(cuda):
    layer = cuda_layer(cuda, torch.bfloat16)
    lora.configure_slots(layer, slots=3, max_rank=5)
    x = make_input("linear", (4, 3)).to(cuda.device, torch.bfloat16)
    first = ["a", "b", None, "c"]
    with torch.no_grad():
        with lora.batch_adapters(layer, first):
            graph, out = captured(lambda: layer(x))
            graph.replay()
            torch.cuda.synchronize()
            check(layer, x, first, out.clone(), torch.bfloat16)
        # other rows, and "default" paged into the least recently used slot: replayed without capturing again
        for names in (["c", None, "a", "b"], ["default", "default", None, "a"]):
            with lora.batch_adapters(layer, names):
                graph.replay()
                torch.cuda.synchronize()
                check(layer, x, names, out.clone(), torch.bfloat16)


@pytest.mark.gpu
def test_beams_serve_the_rows_and_their_repeats_in_one_batch(cuda):
    """batch_adapters(..., expand=3): inputs of the rows and of each row repeated 3 times (generate()'s beams),
    each with its own index buffers (on a GPU, the pool's, kept per size)."""
    layer = cuda_layer(cuda)
    lora.configure_slots(layer, slots=2, max_rank=5)
    names = ["a", None, "c"]
    x, xx = make_input("linear", (3, 2)).to(cuda.device), make_input("linear", (9, 2)).to(cuda.device)
    with torch.no_grad(), lora.batch_adapters(layer, names, expand=3):
        got, got_beams = layer(x), layer(xx)
    cuda.synchronize()
    check(layer, x, names, got)
    check(layer, xx, [n for n in names for _ in range(3)], got_beams)


@pytest.mark.gpu
@pytest.mark.hardware("CUDA graph capture and replay")
def test_a_graph_captured_with_beams_replays_the_next_batch(cuda):
    layer = cuda_layer(cuda)
    lora.configure_slots(layer, slots=3, max_rank=5)
    x, xx = make_input("linear", (2,)).to(cuda.device), make_input("linear", (6,)).to(cuda.device)
    with torch.no_grad():
        with lora.batch_adapters(layer, ["a", "b"], expand=3):
            graph, (out, out_beams) = captured(lambda: (layer(x), layer(xx)))  # (both sizes' buffers)
        for names in (["c", None], ["b", "a"]):  # replayed without capturing again: both sizes follow the batch
            with lora.batch_adapters(layer, names, expand=3):
                graph.replay()
                torch.cuda.synchronize()
                check(layer, x, names, out.clone())
                check(layer, xx, [n for n in names for _ in range(3)], out_beams.clone())


@pytest.mark.gpu
@pytest.mark.hardware("two CUDA streams")
def test_two_threads_on_two_streams(cuda):
    layer = cuda_layer(cuda, host_adapters=False)
    x = make_input("linear", (4,)).to(cuda.device)
    batches = (["a", "b", None, "c"], ["c", "a", "a", None])
    expected = []
    with torch.no_grad():
        for names in batches:
            with lora.batch_adapters(layer, names):
                expected.append(layer(x).clone())
    errors = []
    torch.cuda.synchronize()  # the slots and `expected` written on this stream, before the threads' streams read them

    def serve(names, want):
        stream = torch.cuda.Stream()
        try:
            with torch.cuda.stream(stream), torch.no_grad():
                for _ in range(50):
                    with lora.batch_adapters(layer, names):
                        got = layer(x)
                    stream.synchronize()
                    if not torch.equal(got, want):
                        errors.append(f"{names}: another batch's rows")
                        return
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=serve, args=(n, w)) for n, w in zip(batches, expected)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a serving thread did not finish in 120 s"
    assert not errors, errors


@pytest.mark.gpu
@pytest.mark.hardware("two CUDA streams, one held back by a sleeping kernel")
def test_a_slot_written_on_another_stream_is_waited_for(cuda):
    # A batch that finds its adapters already in their slots must not read them before the write, queued on the
    # stream of the batch that loaded them, has run: stream 1 sleeps, then loads the slots (device-resident
    # adapters: written on the current stream); stream 2's batch of the same adapters reads them at once.
    layer = cuda_layer(cuda, host_adapters=False)
    lora.configure_slots(layer, slots=4, max_rank=5)
    x = make_input("linear", (4,)).to(cuda.device)
    names = ["b", "a", None, "c"]
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.no_grad():
        with torch.cuda.stream(s1):
            torch.cuda._sleep(200_000_000)  # ~0.1 s at the H200's clock: the loads below queue behind it
            with lora.batch_adapters(layer, names):
                pass
        with torch.cuda.stream(s2):
            with lora.batch_adapters(layer, names):
                got = layer(x)
        s2.synchronize()
    torch.cuda.synchronize()
    check(layer, x, names, got.cpu())
