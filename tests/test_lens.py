import torch

from mtp.analysis.lens import entropy_along, lens_logits, logit_lens
from tests.conftest import tiny_model


def test_last_layer_kl_is_zero_and_agrees(arch):
    model = tiny_model(arch)
    ids = torch.randint(3, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, output_hidden_states=True)
    pos = torch.tensor([3, 7, 11])
    kl, agree = logit_lens(model, tuple(h[0, pos] for h in out.hidden_states), out.logits[0, pos])
    assert kl.shape == agree.shape == (model.config.num_hidden_layers + 1, 3)
    assert torch.all(kl[-1] == 0) and torch.all(agree[-1])
    assert torch.all(kl >= 0)


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
