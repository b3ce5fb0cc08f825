"""batch_adapters where the model's input is not seen (a keyword other than input_ids / inputs_embeds / x, or a
submodule called inside the block): the layers' inputs were read one by one, so a broadcast (1, T) input with T the
row count passed as T tokens, position t served row t's adapter for every row (3-4 off, silently). Several leading
dimensions are read rows first then, and the broadcast input is refused as when the input is seen."""
import pytest
import torch
import torch.nn as nn

import lora_ext as lora

V, T, D, R = 20, 3, 8, 2


class _Model(nn.Module):
    def __init__(self, broadcast=True):
        super().__init__()
        self.tok = lora.Embedding(V, D, r=R)
        self.pos = lora.Embedding(T, D, r=R)
        self.out = lora.Linear(D, D, r=R)
        self.broadcast = broadcast

    def forward(self, tokens):
        positions = torch.arange(tokens.shape[-1])
        positions = positions[None] if self.broadcast else positions.expand(tokens.shape)
        return self.out(self.tok(tokens) + self.pos(positions))


def _model(broadcast):
    torch.manual_seed(0)
    m = _Model(broadcast)
    factors = {}
    for name, seed in (("a", 1), ("b", 2)):
        g = torch.Generator().manual_seed(seed)
        for ln in ("tok", "pos", "out"):
            layer = getattr(m, ln)
            sa, sb = layer.factor_shapes(R)
            A, B = torch.randn(sa, generator=g), torch.randn(sb, generator=g)
            layer.add_adapter(name, A, B, 1.5)
            factors[name, ln] = (A.double(), B.double(), 1.5)
    return m.eval(), factors


def _reference(m, factors, ids, name):
    """One row's output in float64 by plain torch."""
    def delta(ln, h):
        if name is None:
            return 0
        A, B, s = factors[name, ln]
        return s * (A.t()[h] if ln != "out" else h @ A.t()) @ B.t()
    positions = torch.arange(ids.shape[0])
    h = m.tok.weight.detach().double()[ids] + delta("tok", ids) + m.pos.weight.detach().double()[positions] \
        + delta("pos", positions)
    return h @ m.out.weight.detach().double().t() + m.out.bias.detach().double() + delta("out", h)


@pytest.mark.parametrize("call", ["keyword", "submodule"])
def test_a_broadcast_input_is_refused_when_the_models_input_is_not_seen(call):
    m, _ = _model(broadcast=True)
    outer = nn.ModuleDict({"inner": m})
    ids = torch.randint(0, V, (3, T))  # 3 rows of T = 3 tokens: the (1, T) positions look like 3 flattened tokens
    with torch.no_grad(), pytest.raises(ValueError, match=r"layer '(inner.)?pos'.*\(1, 3\).*was not seen"), \
            lora.batch_adapters(m if call == "keyword" else outer, ["a", "b", None]):
        m(tokens=ids) if call == "keyword" else outer["inner"](ids)


@pytest.mark.parametrize("call", ["keyword", "submodule"])
def test_rows_are_served_their_adapters_when_the_models_input_is_not_seen(call):
    m, factors = _model(broadcast=False)
    outer = nn.ModuleDict({"inner": m})
    ids = torch.randint(0, V, (3, T))
    rows = ["a", "b", None]
    with torch.no_grad(), lora.batch_adapters(m if call == "keyword" else outer, rows):
        y = (m(tokens=ids) if call == "keyword" else outer["inner"](ids)).double()
    for i, name in enumerate(rows):
        assert (y[i] - _reference(m, factors, ids[i], name)).abs().max().item() < 1e-4


def test_a_linears_flattened_tokens_are_served_and_1d_ids_refused_when_the_models_input_is_not_seen():
    """With the model's input unseen, 1-D ids of as many entries as the rows may be positions (broadcast) or an id
    per row: refused. A Linear's (N, d) input is served an adapter per entry (a serving engine's layout)."""
    m, factors = _model(broadcast=False)
    ids = torch.randint(0, V, (4,))
    rows = ["b", None, "a", "b"]
    with torch.no_grad(), pytest.raises(ValueError, match=r"layer 'tok'.*1-D ids of 4 entries.*was not seen"), \
            lora.batch_adapters(m, rows):
        m.tok(ids)
    h = torch.randn(4, D)
    with torch.no_grad(), lora.batch_adapters(m, rows):
        y = m.out(h).double()
    for i, name in enumerate(rows):
        ref = h[i].double() @ m.out.weight.detach().double().t() + m.out.bias.detach().double()
        if name is not None:
            A, B, s = factors[name, "out"]
            ref = ref + s * h[i].double() @ A.t() @ B.t()
        assert (y[i] - ref).abs().max().item() < 1e-5


class _Pooled(nn.Module):
    """A head on the first token (BERT's pooler): a (rows, d) float input, one vector per row."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids):
        return self.inner.out(self.inner.tok(input_ids)[:, 0])


def test_a_pooled_float_input_is_served_when_the_rows_equal_the_tokens():
    m, factors = _model(broadcast=False)
    pooled = _Pooled(m)
    ids = torch.randint(0, V, (3, T))  # 3 rows of 3 tokens: the pooled (3, d) input looks like 3 positions' vectors
    rows = ["a", None, "b"]
    with torch.no_grad(), lora.batch_adapters(pooled, rows):
        y = pooled(ids).double()
    for i, name in enumerate(rows):
        h = m.tok.weight.detach().double()[ids[i, 0]]
        if name is not None:
            A, B, s = factors[name, "tok"]
            h = h + s * A.t()[ids[i, 0]] @ B.t()
        ref = h @ m.out.weight.detach().double().t() + m.out.bias.detach().double()
        if name is not None:
            A, B, s = factors[name, "out"]
            ref = ref + s * h @ A.t() @ B.t()
        assert (y[i] - ref).abs().max().item() < 1e-4


class _OneD(_Model):
    """nanoGPT's positions, 1-D: torch.arange(T) into the position embedding."""

    def forward(self, input_ids=None, tokens=None):  # (tokens: a keyword the batch does not read)
        ids = input_ids if input_ids is not None else tokens
        return self.out(self.tok(ids) + self.pos(torch.arange(ids.shape[-1])))


def test_a_1d_broadcast_input_is_refused_when_the_rows_equal_the_tokens():
    """A (T,) input with T the row count was read as one entry per row: position p got row p's adapter in every
    row (26 off), the model's input seen or not."""
    m, _ = _model(broadcast=True)
    one_d = _OneD()
    one_d.load_state_dict(m.state_dict())
    for layer in ("tok", "pos", "out"):
        for name in ("a", "b"):
            getattr(one_d, layer).add_adapter(name, *getattr(m, layer).get_adapter(name))
    one_d.eval()
    ids = torch.randint(0, V, (3, T))
    for call in (lambda: one_d(ids), lambda: one_d(input_ids=ids), lambda: one_d(tokens=ids)):
        with torch.no_grad(), pytest.raises(ValueError, match=r"layer 'pos'.*\(3,\).*1-D ids of 3 entries"), \
                lora.batch_adapters(one_d, ["a", "b", None]):
            call()


def test_an_entry_per_row_is_served_as_rows_1_when_the_rows_equal_the_tokens():
    m, factors = _model(broadcast=False)
    ids = torch.randint(0, V, (3, T))
    rows = ["a", None, "b"]
    label = torch.tensor([4, 7, 9])
    with torch.no_grad(), lora.batch_adapters(m, rows):
        m(ids)  # (the model's input: 3 rows of 3 tokens)
        y = m.tok(label[:, None]).double()[:, 0]
    for i, name in enumerate(rows):
        ref = m.tok.weight.detach().double()[label[i]]
        if name is not None:
            A, B, s = factors[name, "tok"]
            ref = ref + s * A.t()[label[i]] @ B.t()
        assert (y[i] - ref).abs().max().item() < 1e-5


def test_1d_ids_into_an_embedding_saved_whole_are_refused_when_the_rows_equal_the_tokens(tmp_path):
    """A position embedding saved whole (modules_to_save) split nanoGPT's torch.arange(T) as rows: position p got
    row p's copy in every row (6.5 off; peft's adapter_names does the same)."""
    import copy

    from peft import LoraConfig, get_peft_model

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos, self.out = nn.Embedding(V, D), nn.Embedding(T, D), nn.Linear(D, D)

        def forward(self, input_ids):
            return self.out(self.tok(input_ids) + self.pos(torch.arange(input_ids.shape[-1])))

    torch.manual_seed(0)
    base = Net().eval()
    config = dict(r=2, target_modules=["out"], modules_to_save=["pos"], init_lora_weights=False)
    for name in ("a", "b"):
        pm = get_peft_model(copy.deepcopy(base), LoraConfig(**config))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "modules_to_save" in n:
                    p.add_(torch.randn_like(p))
        pm.save_pretrained(str(tmp_path / name))
    model = copy.deepcopy(base)
    lora.load_peft_adapter(model, str(tmp_path / "a"), "a")
    lora.load_peft_adapter(model, str(tmp_path / "b"), "b", activate=False)
    model.eval()
    ids = torch.randint(0, V, (3, T))
    with torch.no_grad(), pytest.raises(ValueError, match=r"module 'pos'.*ids of shape \(3,\).*1-D ids of 3 entries"), \
            lora.batch_adapters(model, ["a", "b", None]):
        model(ids)


def test_a_decoders_1d_positions_are_refused_when_they_equal_the_rows_but_not_the_inputs_tokens():
    """An encoder-decoder of one's own: the decoder's torch.arange(T_dec), T_dec the rows but not the encoder
    input's tokens, was served one position per row (2.3 off)."""
    class S2S(nn.Module):
        def __init__(self):
            super().__init__()
            self.src, self.tgt = nn.Embedding(16, 8), nn.Embedding(16, 8)
            self.pos = lora.Embedding(16, 8, r=2)

        def forward(self, x, tgt):
            memory = self.src(x).mean(1, keepdim=True)
            return self.tgt(tgt) + self.pos(torch.arange(tgt.shape[1])) + memory

    torch.manual_seed(0)
    m = S2S()
    g = torch.Generator().manual_seed(3)
    a, b = m.pos.factor_shapes(2)
    m.pos.add_adapter("b", torch.randn(a, generator=g), torch.randn(b, generator=g), 1.0)
    m.eval()
    x, tgt = torch.randint(0, 16, (3, 5)), torch.randint(0, 16, (3, 3))
    with torch.no_grad(), pytest.raises(ValueError, match=r"layer 'pos'.*\(3,\).*1-D ids of 3 entries"), \
            lora.batch_adapters(m, ["default", "b", "default"]):
        m(x, tgt)
