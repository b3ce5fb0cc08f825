"""Ordering one layer's CUDA work across streams.

The layer lock orders merge, unmerge, switch and forward calls on the host; their kernels still run on
whatever stream was current for each call. Without more, a switch on one stream can rewrite the weight (or
the live factors) while a forward's GEMM on another stream still reads them, and storage a forward read can
be handed to a new allocation before that forward ran. `StreamOrder` closes both gaps, with no device sync:

- a write (merge, unmerge, switch, load) waits for the work every other stream has queued on the layer;
- a read (forward, state_dict) on a stream other than the last writer's waits for that write, once;
- storage that a write drops is recorded on every stream that used the layer (`Tensor.record_stream`), so
  the caching allocator does not reuse it before their work is done.

The caller holds the layer lock. CPU tensors cost one attribute check. Inside a CUDA graph capture nothing is
waited on (a capture cannot depend on work outside it); replays run in the order they are launched.
"""
import torch


class StreamOrder:
    __slots__ = ("writer", "users", "synced")

    def __init__(self):
        self.writer = None  # the stream of the last write
        self.users = {}  # stream id -> stream, for every stream that used the layer since the last write
        self.synced = set()  # streams that already waited for the last write

    def read(self, device: torch.device) -> None:
        if device.type != "cuda":
            return
        cur = torch.cuda.current_stream(device)
        key = cur.cuda_stream
        writer = self.writer
        if (writer is not None and key not in self.synced and writer.cuda_stream != key
                and not torch.cuda.is_current_stream_capturing()):
            cur.wait_stream(writer)
        self.synced.add(key)
        self.users[key] = cur

    def write(self, device: torch.device) -> None:
        if device.type != "cuda":
            return
        cur = torch.cuda.current_stream(device)
        if not torch.cuda.is_current_stream_capturing():
            for key, stream in self.users.items():
                if key != cur.cuda_stream:
                    cur.wait_stream(stream)
            if self.writer is not None and self.writer.cuda_stream != cur.cuda_stream:
                cur.wait_stream(self.writer)
        self.writer = cur
        self.synced = {cur.cuda_stream}
        self.users[cur.cuda_stream] = cur

    def retire(self, *tensors) -> None:
        """Storage about to be dropped: the allocator waits for every stream that used the layer."""
        for t in tensors:
            if t is not None and t.is_cuda:
                for stream in self.users.values():
                    t.record_stream(stream)
