import torch

from mtp.analysis.lens import entropy_along, lens_logits, logit_lens
from tests.conftest import tiny_model


def _independent_lens(model, ids, pos):
    """Per layer (embeddings, layer 1, ..., layer N) the log-probabilities at ``pos``, computed without lens.py:
    transformers' hidden states through ``model.model.norm``, ``model.lm_head`` and the config's soft-capping;
    the last layer from its raw (pre-norm) output, caught by a hook, so that its row is computed too."""
    seen = {}
    hook = model.model.layers[-1].register_forward_hook(
        lambda mod, args, out: seen.setdefault("h", out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    hook.remove()
    cap = getattr(model.config, "final_logit_softcapping", None)
    rows = []
    with torch.no_grad():
        for h in list(out.hidden_states[:-1]) + [seen["h"]]:
            logits = torch.matmul(model.model.norm(h[0, pos]), model.lm_head.weight.T)
            if cap:
                logits = cap * torch.tanh(logits / cap)
            rows.append(torch.log_softmax(logits.double(), -1))
    return out, torch.stack(rows)  # (N + 1, P, V)


def test_lens_kl_and_agreement_match_an_independent_computation_at_every_layer(arch):
    model = tiny_model(arch)
    ids = torch.randint(3, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(12)
    out, logp = _independent_lens(model, ids, pos)
    final = torch.log_softmax(out.logits[0, pos].double(), -1)
    assert torch.allclose(logp[-1], final, atol=1e-10)  # the last layer read through the lens is the output
    expect_kl = (logp.exp() * (logp - final)).sum(-1)  # KL(p_layer || p_final), (N + 1, P)
    expect_agree = logp.argmax(-1) == final.argmax(-1)
    kl, agree = logit_lens(model, tuple(h[0, pos] for h in out.hidden_states), out.logits[0, pos])
    assert kl.shape == agree.shape == (model.config.num_hidden_layers + 1, 12)
    assert torch.allclose(kl.double(), expect_kl, rtol=1e-6, atol=1e-9), (kl, expect_kl)
    assert torch.equal(agree, expect_agree)
    assert kl[-1].abs().max() < 1e-9 and bool(agree[-1].all())
    # earlier layers differ from the output (KL ~1e-4 here, far above the 1e-9 tolerance): not 0 == 0
    assert float(expect_kl[:-1].min()) > 1e-5


def test_lens_of_last_pre_norm_state_is_the_model_output(arch):
    """The lens applies the model's own final norm + unembedding: on the last layer's raw output it
    reproduces the logits exactly (checked through a hook, independent of output_hidden_states)."""
    model = tiny_model(arch)
    ids = torch.randint(3, 64, (1, 9), generator=torch.Generator().manual_seed(1))
    seen = {}
    hook = model.get_decoder().layers[-1].register_forward_hook(
        lambda mod, args, out: seen.setdefault("h", out[0] if isinstance(out, tuple) else out))
    logits = model(input_ids=ids).logits
    hook.remove()
    assert torch.allclose(lens_logits(model, seen["h"]), logits, atol=1e-12)


def test_entropy_along_sequence():
    model = tiny_model("llama")
    ids = torch.randint(3, 64, (15,))
    ent = entropy_along(model, ids)
    assert ent.shape == (15,)
    assert torch.all(ent >= 0) and torch.all(ent <= torch.log(torch.tensor(64.0)) + 1e-9)
