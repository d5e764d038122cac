"""Permutation specs, weight matching and activation matching: permuted models compute the same function."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from evomerge import tiny
from evomerge.alignment.activation_matching import activation_matching
from evomerge.alignment.permutation_spec import (
    apply_permutation,
    inverse_permutation,
    llama_permutation_spec,
    resnet_permutation_spec,
    sequential_permutation_spec,
)
from evomerge.alignment.weight_matching import check_compatible, weight_matching
from evomerge.errors import EvomergeError

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is fastest here


def random_perms(spec, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randperm(n, generator=gen) for name, n in spec.sizes.items()}


def randomize_norms(model: nn.Module, seed: int = 0) -> None:
    """Give norm layers non-trivial affine parameters and running statistics, so a wrong permutation shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen))
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


def mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 24), nn.LayerNorm(24), nn.ReLU(),
                         nn.Linear(24, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5)).eval()


def mlp_tanh(seed: int) -> nn.Sequential:
    """No dead units (a dead ReLU unit is silent on all data, so which one it is cannot be told from activations)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 24), nn.LayerNorm(24), nn.Tanh(),
                         nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 5)).eval()


def cnn(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.GroupNorm(6, 6), nn.ReLU(),
                         nn.Flatten(), nn.Linear(6 * 5 * 5, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


class TinyResNet(nn.Module):
    def __init__(self, width: int = 8, inner: int = 12, blocks: int = 2):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.blocks = nn.ModuleList()
        for _ in range(blocks):
            self.blocks.append(nn.ModuleDict({
                "conv1": nn.Conv2d(width, inner, 3, padding=1, bias=False), "bn1": nn.BatchNorm2d(inner),
                "conv2": nn.Conv2d(inner, width, 3, padding=1, bias=False), "bn2": nn.BatchNorm2d(width)}))
        self.head = nn.Linear(width, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        for b in self.blocks:
            h = torch.relu(b["bn1"](b["conv1"](x)))
            x = torch.relu(x + b["bn2"](b["conv2"](h)))
        return self.head(x.mean(dim=(2, 3)))


def resnet_spec(model: TinyResNet):
    blocks = [([f"blocks.{i}.conv1", f"blocks.{i}.bn1"], [f"blocks.{i}.conv2", f"blocks.{i}.bn2"])
              for i in range(len(model.blocks))]
    return resnet_permutation_spec(model, ["conv", "bn"], blocks, "head")


def permuted_copy(model: nn.Module, spec, perms) -> nn.Module:
    import copy

    out = copy.deepcopy(model)
    out.load_state_dict(apply_permutation(spec, perms, model.state_dict()))
    return out.eval()


@pytest.mark.parametrize("make, x_shape", [(mlp, (7, 12)), (cnn, (5, 3, 5, 5))])
def test_sequential_random_permutation_is_function_preserving(make, x_shape):
    model = make(0)
    randomize_norms(model)
    spec = sequential_permutation_spec(model)
    perms = random_perms(spec)
    assert all((p != torch.arange(len(p))).any() for p in perms.values())
    x = torch.randn(*x_shape)
    permuted = permuted_copy(model, spec, perms)
    first = spec.perms["P_0"][0].param
    assert not torch.equal(permuted.state_dict()[first], model.state_dict()[first])
    torch.testing.assert_close(permuted(x), model(x), rtol=1e-5, atol=1e-5)


def test_cnn_flatten_block_and_norm_buffers_in_spec():
    spec = sequential_permutation_spec(cnn(0))
    assert spec.sizes == {"P_0": 8, "P_1": 6, "P_2": 16}
    p1 = {(a.param, a.axis, a.block) for a in spec.perms["P_1"]}
    assert ("7.weight", 1, 25) in p1  # each channel is 5*5 inputs of the Linear after Flatten
    p0 = {a.param for a in spec.perms["P_0"]}
    assert {"1.running_mean", "1.running_var", "1.weight", "1.bias"} <= p0


def test_resnet_random_permutation_is_function_preserving():
    torch.manual_seed(0)
    model = TinyResNet().eval()
    randomize_norms(model)
    spec = resnet_spec(model)
    perms = random_perms(spec, seed=3)
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(permuted_copy(model, spec, perms)(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make, x_shape", [(mlp, (64, 12)), (cnn, (32, 3, 5, 5))])
def test_weight_matching_undoes_a_permutation(make, x_shape):
    """B = A with its units shuffled: weight matching must find the shuffle, so B permuted equals A exactly."""
    a = make(0)
    randomize_norms(a)
    spec = sequential_permutation_spec(a)
    b = permuted_copy(a, spec, random_perms(spec, seed=5))
    perms = weight_matching(spec, a.state_dict(), b.state_dict())
    aligned = apply_permutation(spec, perms, b.state_dict())
    for k, v in a.state_dict().items():
        torch.testing.assert_close(aligned[k], v, rtol=0, atol=0)


def test_activation_matching_undoes_a_permutation_and_preserves_function():
    a = mlp_tanh(0)
    randomize_norms(a)
    spec = sequential_permutation_spec(a)
    b = permuted_copy(a, spec, random_perms(spec, seed=7))
    x = torch.randn(256, 12)
    perms = activation_matching(spec, a, b, [x[:128], x[128:]])
    aligned = apply_permutation(spec, perms, b.state_dict())
    for k, v in a.state_dict().items():
        torch.testing.assert_close(aligned[k], v, rtol=0, atol=0)
    # two different networks: the aligned B still computes B's function
    c = mlp_tanh(1)
    perms = activation_matching(spec, a, c, [x])
    torch.testing.assert_close(permuted_copy(c, spec, perms)(x), c(x), rtol=1e-5, atol=1e-5)


def test_weight_matching_two_different_mlps_brings_them_closer():
    a, b = mlp(0), mlp(1)
    spec = sequential_permutation_spec(a)
    sa, sb = a.state_dict(), b.state_dict()
    aligned = apply_permutation(spec, weight_matching(spec, sa, sb), sb)
    dist = lambda s: sum(float((s[k] - sa[k]).pow(2).sum()) for k in sa if sa[k].is_floating_point())  # noqa: E731
    assert dist(aligned) < dist(sb)
    x = torch.randn(9, 12)
    c = mlp(1)
    c.load_state_dict(aligned)
    torch.testing.assert_close(c.eval()(x), b(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch, kwargs", [
    ("llama", {"num_heads": 4, "num_kv_heads": 2}),                        # grouped-query attention
    ("llama", {"num_heads": 4, "num_kv_heads": 4, "tie_word_embeddings": True}),
    ("qwen2", {"num_heads": 4, "num_kv_heads": 2}),                        # q/k/v biases
])
def test_tiny_llama_random_permutation_is_function_preserving(arch, kwargs):
    model = tiny.make_model(arch, seed=0, vocab_size=64, hidden_size=32, num_layers=2, intermediate_size=48,
                            **kwargs)
    names = [n for n, _ in model.named_parameters()]  # tied: lm_head.weight is not a separate parameter
    spec = llama_permutation_spec(model.config, names)
    assert ("P_heads_0" in spec.sizes) == (kwargs["num_kv_heads"] > 1)
    perms = random_perms(spec, seed=1)
    state = {k: v for k, v in model.state_dict().items() if k in names}
    spec.check(state)
    permuted_state = apply_permutation(spec, perms, state)
    other = tiny.make_model(arch, seed=9, vocab_size=64, hidden_size=32, num_layers=2, intermediate_size=48,
                            **kwargs)
    other.load_state_dict(permuted_state, strict=False)
    assert not torch.equal(other.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight)
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(other(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["Qwen3", "Mistral"])
def test_other_llama_style_families_permute_function_preserving(family):
    import transformers

    config = getattr(transformers, f"{family}Config")(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, head_dim=8)
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # non-trivial RMSNorm weights (Qwen3's per-head q/k norms included)
    names = [n for n, _ in model.named_parameters()]
    spec = llama_permutation_spec(config, names)
    state = {k: v for k, v in model.state_dict().items() if k in names}
    other = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    other.load_state_dict(apply_permutation(spec, random_perms(spec, seed=1), state), strict=False)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(other(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)


def test_permuting_heads_across_kv_groups_breaks_gqa():
    """Negative control: a q-head permutation that ignores the KV grouping changes the function."""
    model = tiny.make_model("llama", seed=0, vocab_size=64, hidden_size=32, num_layers=1, intermediate_size=48,
                            num_heads=4, num_kv_heads=2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hd = 8
    swap = torch.cat([torch.arange(hd, 2 * hd), torch.arange(hd), torch.arange(2 * hd, 4 * hd)])  # heads 0<->1
    swap2 = torch.cat([torch.arange(2 * hd, 3 * hd), torch.arange(hd, 2 * hd), torch.arange(hd),
                       torch.arange(3 * hd, 4 * hd)])  # heads 0<->2: crosses KV groups
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        ref = model(ids).logits.clone()
        for perm, same in ((swap, True), (swap2, False)):
            s = dict(state)
            s["model.layers.0.self_attn.q_proj.weight"] = state["model.layers.0.self_attn.q_proj.weight"][perm]
            s["model.layers.0.self_attn.o_proj.weight"] = state["model.layers.0.self_attn.o_proj.weight"][:, perm]
            model.load_state_dict(s)
            assert torch.allclose(model(ids).logits, ref, atol=1e-5) == same


def test_weight_matching_recovers_llama_permutation():
    model = tiny.make_model("llama", seed=0, vocab_size=64, hidden_size=32, num_layers=2, intermediate_size=48,
                            num_heads=4, num_kv_heads=2)
    state = dict(model.state_dict())
    spec = llama_permutation_spec(model.config, list(state))
    perms = random_perms(spec, seed=2)
    shuffled = apply_permutation(spec, perms, state)
    found = weight_matching(spec, state, shuffled)
    for name, p in perms.items():
        assert torch.equal(found[name], inverse_permutation(p)), name


def test_mismatched_models_give_one_line_errors():
    a, b = mlp(0).state_dict(), mlp(1).state_dict()
    b["0.weight"] = torch.zeros(33, 12)
    with pytest.raises(EvomergeError) as err:
        check_compatible(a, b)
    assert "\n" not in str(err.value) and "'0.weight'" in str(err.value) and "(32, 12)" in str(err.value)
    del b["0.weight"]
    with pytest.raises(EvomergeError, match="only in model A") as err:
        check_compatible(a, b)
    assert "\n" not in str(err.value)
    spec = sequential_permutation_spec(mlp(0))
    with pytest.raises(EvomergeError, match="expects") as err:
        spec.check({**a, "2.weight": torch.zeros(25, 32)})
    assert "\n" not in str(err.value)
