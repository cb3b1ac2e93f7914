"""A speechbrain user's workflow around the layer: whole-model conversion both ways
(`convert_speechbrain` / `to_speechbrain`), optimizer states that resume on either side, and which
backend ran (`last_backend`, `explain`).

Optimizer states: torch's Optimizer.state_dict indexes each parameter's state (Adam's moments)
by its position in the parameter list, so a state saved over a speechbrain model resumes over the
converted one only when both list their parameters in the same order; a wrong order loads without
error and then fails (or mixes up moments of equal shape) at the next step. The resume tests run
in float64 so that the comparison shows the order and the conversion, not rounding: both sides
then differ only in the summation order of the gradients (about 1e-16 relative), which Adam's
update m / (sqrt(v) + eps) passes on at that scale (measured: 3e-16 of the largest parameter after
two steps); 1e-12 leaves a wide margin and still catches a conversion that rounds the weights
through float32 (5e-8) or a state that lands on the wrong parameter (1e-2).
"""
import copy

import pytest
import torch
from torch import nn

import hmx_kernels
from hmx_kernels import FusedHyperMixing, convert_speechbrain, explain, to_speechbrain
from hmx_kernels.integrations.speechbrain import is_speechbrain_hypermixing, speechbrain_from_fused
from utils import assert_close, import_speechbrain

RTOL_FP32 = 1e-5  # outputs of a converted model in fp32 (same operation order for the outputs)
RTOL_FP64 = 1e-12  # optimizer steps in fp64 (see the module docstring)


@pytest.fixture(scope="module")
def sb():
    """speechbrain's HyperMixing and encoder modules."""
    import types

    return types.SimpleNamespace(
        HyperMixing=import_speechbrain("speechbrain.nnet.hypermixing").HyperMixing,
        Transformer=import_speechbrain("speechbrain.lobes.models.transformer.Transformer"),
        Conformer=import_speechbrain("speechbrain.lobes.models.transformer.Conformer"),
        Branchformer=import_speechbrain("speechbrain.lobes.models.transformer.Branchformer"),
    )


def _signature(model):
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]


def _mask(B, N):
    m = torch.zeros(B, N, dtype=torch.bool)
    for b in range(1, B):
        m[b, N - max(1, (b * N) // (B + 1)):] = True
    return m


# ---- parameter order --------------------------------------------------------------------------
@pytest.mark.parametrize("tied,fix", [(False, False), (True, False), (False, True)])
def test_named_parameters_match_speechbrain_one_to_one(sb, tied, fix):
    torch.manual_seed(0)
    module = sb.HyperMixing(32, 64, tied=tied, num_heads=4, fix_tm_hidden_size=fix)
    built = FusedHyperMixing(32, 64, tied=tied, num_heads=4, fix_tm_hidden_size=fix)
    converted = FusedHyperMixing.from_speechbrain(module)
    assert _signature(built) == _signature(module)  # names, order and shapes
    assert _signature(converted) == _signature(module)
    sb2 = speechbrain_from_fused(converted)
    assert type(sb2) is sb.HyperMixing and _signature(sb2) == _signature(module)


def test_float64_modules_convert_without_rounding(sb):
    """Both directions load the weights after moving to the module's dtype (loading into a float32
    layer first would round them)."""
    from test_idiap_variant import IdiapStyleHyperMixing

    torch.manual_seed(0)
    module = sb.HyperMixing(16, 32, num_heads=2).double()
    fused = FusedHyperMixing.from_speechbrain(module)
    back = speechbrain_from_fused(fused)
    idiap = IdiapStyleHyperMixing(16, 32, num_heads=2, hypernetwork_bias=True).double()
    for src, dst in ((module, fused), (module, back), (idiap, FusedHyperMixing.from_idiap(idiap))):
        for (name, a), (_, b) in zip(src.named_parameters(), dst.named_parameters()):
            assert b.dtype == torch.float64 and torch.equal(a, b), name


def test_named_parameters_match_idiap_one_to_one():
    """idiap's _ParallelMLPs registers both weights before both biases: the idiap variant keeps it."""
    from test_idiap_variant import IdiapStyleHyperMixing

    torch.manual_seed(0)
    for tied in (False, True):
        module = IdiapStyleHyperMixing(32, 64, tied=tied, num_heads=4, hypernetwork_bias=True)
        fused = FusedHyperMixing.from_idiap(module)
        assert _signature(fused) == _signature(module)
        assert [n for n, _ in fused.named_parameters()][:4] == [
            "hyper.w1_gen.fc1_weights", "hyper.w1_gen.fc2_weights", "hyper.w1_gen.fc1_biases",
            "hyper.w1_gen.fc2_biases"]


# ---- Adam states resume on the other side -----------------------------------------------------
def _batches(d, n_steps, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 7, d, generator=g, dtype=torch.float64),
             torch.randn(2, 7, d, generator=g, dtype=torch.float64)) for _ in range(n_steps)]


def _train(model, opt, batches):
    for x, target in batches:
        opt.zero_grad()
        out = model(x, x, x, key_padding_mask=_mask(2, 7))[0]
        loss = ((out - target) ** 2).mean()
        loss.backward()
        opt.step()


def _params(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _assert_same_params(got, want, rtol, what):
    assert list(got) == list(want)
    for name in want:
        assert_close(f"{what}: {name}", got[name], want[name], rtol)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("direction", ["speechbrain_to_fused", "fused_to_speechbrain"])
def test_adam_state_resumes_on_the_other_side(sb, tied, direction):
    """Train a few steps on one side, save the model and Adam states, convert, load the Adam state
    into an optimizer over the converted layer: its next step equals the original's next step."""
    torch.manual_seed(1)
    d = 16
    start = sb.HyperMixing(d, 48, tied=tied, num_heads=2).double()
    if direction == "fused_to_speechbrain":
        start = FusedHyperMixing.from_speechbrain(start, backend="cpu")
    opt = torch.optim.Adam(start.parameters(), lr=1e-2)
    _train(start, opt, _batches(d, 3, seed=2))
    saved_opt = copy.deepcopy(opt.state_dict())
    saved = copy.deepcopy(start)

    next_steps = _batches(d, 2, seed=3)
    _train(start, opt, next_steps)  # the run as it would have continued
    want = _params(start)

    if direction == "speechbrain_to_fused":
        resumed = FusedHyperMixing.from_speechbrain(saved, backend="cpu")
    else:
        resumed = speechbrain_from_fused(saved)
        assert type(resumed) is sb.HyperMixing
    assert type(resumed) is not type(start)
    opt2 = torch.optim.Adam(resumed.parameters(), lr=1e-2)
    opt2.load_state_dict(saved_opt)
    _train(resumed, opt2, next_steps)
    _assert_same_params(_params(resumed), want, RTOL_FP64, "resumed")

    # the comparison sees the state: a fresh Adam from the same weights takes other steps
    fresh = copy.deepcopy(saved)
    _train(fresh, torch.optim.Adam(fresh.parameters(), lr=1e-2), next_steps)
    moved = max((fresh_p - want[name]).abs().max().item() for name, fresh_p in _params(fresh).items())
    assert moved > 1e-4


# ---- whole-model conversion -------------------------------------------------------------------
def _encoders(sb):
    """Small speechbrain encoders with HyperMixing, and how each is called."""
    torch.manual_seed(4)
    transformer = sb.Transformer.TransformerEncoder(num_layers=2, nhead=2, d_ffn=32, d_model=16,
                                                    attention_type="hypermixing", normalize_before=True)
    conformer = sb.Conformer.ConformerEncoder(num_layers=2, d_model=16, d_ffn=32, nhead=2, kernel_size=3,
                                              attention_type="hypermixing")
    branchformer = sb.Branchformer.BranchformerEncoder(num_layers=2, d_model=16, nhead=2, kernel_size=3,
                                                       attention_type="hypermixing", csgu_linear_units=32)
    return {"transformer": (transformer, "self_att"), "conformer": (conformer, "mha_layer"),
            "branchformer": (branchformer, "mha_layer")}


def _hypermixing_sites(model):
    sb_sites = [n for n, m in model.named_modules() if is_speechbrain_hypermixing(m)]
    fused_sites = [n for n, m in model.named_modules() if isinstance(m, FusedHyperMixing)]
    return sb_sites, fused_sites


@pytest.mark.parametrize("kind", ["transformer", "conformer", "branchformer"])
def test_convert_and_export_a_whole_encoder(sb, kind):
    encoder, attr = _encoders(sb)[kind]
    encoder.eval()
    x = torch.randn(2, 13, 16)
    mask = _mask(2, 13)
    want = encoder(x, src_key_padding_mask=mask)[0]
    signature = _signature(encoder)
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    sites = [f"layers.{i}.{attr}" for i in range(2)]
    assert _hypermixing_sites(encoder) == (sites, [])

    assert convert_speechbrain(encoder, backend="cpu") == 2
    assert _hypermixing_sites(encoder) == ([], sites)
    assert all(not m.training for m in encoder.modules())  # eval mode kept
    assert _signature(encoder) == signature
    assert_close(f"{kind} converted", encoder(x, src_key_padding_mask=mask)[0], want, RTOL_FP32)
    assert convert_speechbrain(encoder) == 0  # nothing left to convert

    assert to_speechbrain(encoder) == 2
    assert _hypermixing_sites(encoder) == (sites, [])
    assert _signature(encoder) == signature
    round_trip = encoder.state_dict()
    assert list(round_trip) == list(state)
    for k in state:
        assert torch.equal(round_trip[k], state[k]), k
    assert_close(f"{kind} exported", encoder(x, src_key_padding_mask=mask)[0], want, RTOL_FP32)


def test_convert_nested_and_shared_modules_keeps_flags(sb):
    torch.manual_seed(5)
    shared = sb.HyperMixing(16, 32, num_heads=2)
    frozen = sb.HyperMixing(16, 32, num_heads=2)
    frozen.hyper.w1_gen.fc1_weights.requires_grad_(False)
    model = nn.ModuleDict({
        "a": nn.Sequential(nn.Linear(16, 16), shared),
        "b": nn.ModuleList([nn.ModuleDict({"inner": shared}), frozen]),
    })
    model.train()
    frozen.eval()
    assert convert_speechbrain(model, attn_mask_policy="honour") == 2  # distinct modules
    assert model["a"][1] is model["b"][0]["inner"]  # shared stays shared
    new_frozen = model["b"][1]
    assert isinstance(new_frozen, FusedHyperMixing) and new_frozen.attn_mask_policy == "honour"
    assert not new_frozen.training and model["a"][1].training
    assert not new_frozen.hyper.w1_gen.fc1_weights.requires_grad
    assert new_frozen.hyper.w1_gen.fc2_weights.requires_grad
    with pytest.warns(UserWarning, match="ignores"):  # speechbrain ignores attn_mask; "honour" does not
        assert to_speechbrain(model) == 2
    assert model["a"][1] is model["b"][0]["inner"] and type(model["a"][1]) is sb.HyperMixing
    assert not model["b"][1].hyper.w1_gen.fc1_weights.requires_grad


def test_conversion_refuses_what_it_cannot_do_and_changes_nothing(sb):
    layer = sb.HyperMixing(16, 32, num_heads=2)
    with pytest.raises(TypeError, match="itself"):
        convert_speechbrain(layer)
    model = nn.ModuleList([FusedHyperMixing(16, 32, num_heads=2),
                           FusedHyperMixing(16, 32, num_heads=2, variant="idiap")])
    with pytest.raises(ValueError, match=r"1 has no speechbrain equivalent.*idiap"):
        to_speechbrain(model)
    assert all(isinstance(m, FusedHyperMixing) for m in model)
    with pytest.raises(ValueError, match="causal"):
        speechbrain_from_fused(FusedHyperMixing(16, 32, num_heads=2, causal=True))


# ---- a HyperConformer, end to end -------------------------------------------------------------
class _HyperConformerModel(nn.Module):
    """A small speechbrain HyperConformer encoder with a linear head (what a recipe trains)."""

    def __init__(self, sb):
        super().__init__()
        self.encoder = sb.Conformer.ConformerEncoder(num_layers=2, d_model=16, d_ffn=32, nhead=2, kernel_size=3,
                                                     attention_type="hypermixing")
        self.head = nn.Linear(16, 5)

    def forward(self, x, mask):
        return self.head(self.encoder(x, src_key_padding_mask=mask)[0])


def _train_model(model, opt, batches):
    losses = []
    for x, target, mask in batches:
        opt.zero_grad()
        loss = ((model(x, mask) - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_hyperconformer_trains_saves_and_resumes_on_either_side(sb, tmp_path):
    """Train a HyperConformer in speechbrain, checkpoint model and Adam to a file; a fresh model
    converted in one call loads both and continues exactly as speechbrain continues; its own
    checkpoint then resumes in a plain speechbrain model exactly as the converted one continues."""
    torch.manual_seed(6)
    g = torch.Generator().manual_seed(7)
    batches = [(torch.randn(2, 11, 16, generator=g, dtype=torch.float64),
                torch.randn(2, 11, 5, generator=g, dtype=torch.float64), _mask(2, 11)) for _ in range(6)]

    def checkpoint(model, opt, name):
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / name)

    def resume(model, name):
        ckpt = torch.load(tmp_path / name)
        model.load_state_dict(ckpt["model"], strict=True)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        opt.load_state_dict(ckpt["optimizer"])
        return opt

    original = _HyperConformerModel(sb).double()
    opt = torch.optim.Adam(original.parameters(), lr=3e-3)
    _train_model(original, opt, batches[:2])
    checkpoint(original, opt, "sb.ckpt")
    want_losses = _train_model(original, opt, batches[2:4])  # speechbrain continuing
    checkpoint(original, opt, "sb2.ckpt")
    want_more = _train_model(original, opt, batches[4:])

    converted = _HyperConformerModel(sb).double()
    assert convert_speechbrain(converted, backend="cpu") == 2
    opt = resume(converted, "sb.ckpt")
    got_losses = _train_model(converted, opt, batches[2:4])
    assert converted.encoder.layers[0].mha_layer.last_backend == "cpu"
    assert got_losses == pytest.approx(want_losses, rel=1e-12)
    checkpoint(converted, opt, "fused.ckpt")
    ref = _HyperConformerModel(sb).double()
    ref.load_state_dict(torch.load(tmp_path / "sb2.ckpt")["model"])
    _assert_same_params(_params(converted), _params(ref), RTOL_FP64, "converted after 4 steps")

    exported = _HyperConformerModel(sb).double()  # plain speechbrain again
    opt = resume(exported, "fused.ckpt")
    got_more = _train_model(exported, opt, batches[4:])
    assert got_more == pytest.approx(want_more, rel=1e-12)
    _assert_same_params(_params(exported), _params(original), RTOL_FP64, "exported after 6 steps")


# ---- which backend ran ------------------------------------------------------------------------
def test_last_backend_and_explain():
    torch.manual_seed(8)
    x = torch.randn(2, 9, 16)
    layer = FusedHyperMixing(16, 32, num_heads=2)
    assert layer.last_backend is None
    layer(x)
    assert layer.last_backend == "cpu"
    report = explain(layer, x)
    assert report.backend == "cpu" and report.requested == "auto"
    assert report.reasons["cpu"] == [] and report.reasons["reference"] == []
    assert "before it in the auto order" in report.why_not("reference")
    assert "cuda" in report.why_not("cuda")
    assert str(report).startswith("ran: cpu")
    assert layer._dispatch_probe is None  # explain leaves nothing behind

    layer.backend = "reference"
    layer(x)
    assert layer.last_backend == "reference"
    report = explain(layer, x)
    assert report.backend == "reference" and "backend='reference' was requested" in report.why_not("cpu")
    assert set(report.reasons) == set(hmx_kernels.registered_backends())

    # packed sequences take the same route: recorded and explained, with the packed problem's reasons
    packed, cu = torch.randn(12, 16), torch.tensor([0, 5, 12], dtype=torch.int32)
    layer.backend = "auto"
    layer.last_backend = None
    layer(packed, cu_seqlens=cu, max_seqlen=7)
    assert layer.last_backend == "cpu"
    report = explain(layer, packed, cu_seqlens=cu, max_seqlen=7)
    assert report.backend == "cpu" and report.reasons["cpu"] == []
    if "cuda" in report.reasons:
        assert any("cuda" in r for r in report.reasons["cuda"])


def test_explain_a_converted_model(sb):
    encoder, _ = _encoders(sb)["conformer"]
    convert_speechbrain(encoder.eval(), backend="cpu")
    encoder.layers[1].mha_layer.backend = "reference"
    reports = explain(encoder, torch.randn(2, 9, 16))
    assert {name: r.backend for name, r in reports.items()} == {
        "layers.0.mha_layer": "cpu", "layers.1.mha_layer": "reference"}
    with pytest.raises(ValueError, match="no FusedHyperMixing"):
        explain(nn.Linear(2, 2), torch.randn(1, 2))


def test_last_backend_under_torch_compile_fullgraph():
    """Recording the backend is no graph break, and a compiled call records it too."""
    torch._dynamo.reset()
    torch.manual_seed(9)
    layer = FusedHyperMixing(16, 32, num_heads=2, backend="cpu")
    x = torch.randn(2, 9, 16)
    explanation = torch._dynamo.explain(lambda t: layer(t)[0])(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: layer(t)[0], fullgraph=True, backend="eager")
    layer.last_backend = None
    assert_close("compiled", compiled(x), layer(x)[0], 1e-6)
    layer.last_backend = None
    compiled(x)
    assert layer.last_backend == "cpu"
    torch._dynamo.reset()
