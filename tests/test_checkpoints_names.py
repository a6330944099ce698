"""Name mapping: rules are accepted only when every shape fits; otherwise names stay anonymous."""

from __future__ import annotations

import json
from collections import OrderedDict

import torch
from checkpoint_factories import gpt2_spec, make_hf_trainer, make_params, qwen2_spec

from adapprox_cli.checkpoints import load_checkpoint, matrix_view_shape
from adapprox_cli.checkpoints import names as naming


def test_normalize_name_strips_wrappers():
    assert naming.normalize_name("_orig_mod.transformer.wte.weight") == "transformer.wte.weight"
    assert (
        naming.normalize_name("module._fsdp_wrapped_module.layers.0._checkpoint_wrapped_module.w")
        == "layers.0.w"
    )
    assert naming.normalize_name("_forward_module.net.0.weight") == "net.0.weight"
    assert (
        naming.normalize_name("encoder.module.weight") == "encoder.module.weight"
    )  # only a leading DDP prefix


def test_order_names_recovers_named_parameters_order():
    for spec, model_type in ((gpt2_spec(layers=12), "gpt2"), (qwen2_spec(layers=3), "qwen2")):
        names = [n for n, _ in spec]
        assert naming.order_names(sorted(names), model_type) == names
    # Without a known architecture: natural numbers and weight before bias.
    assert naming.order_names(["10.bias", "2.weight", "10.weight", "2.bias"]) == [
        "2.weight",
        "2.bias",
        "10.weight",
        "10.bias",
    ]


def test_model_params_drop_tied_duplicates_and_buffers():
    w = torch.randn(5, 4)
    state = OrderedDict(
        [
            ("wte.weight", w),
            ("h.0.attn.bias", torch.ones(1, 1, 4, 4)),
            ("bn.running_mean", torch.zeros(4)),
            ("bn.num_batches_tracked", torch.tensor(3)),
            ("lm_head.weight", w),  # tied: same storage
            ("other.weight", w.clone()),  # equal values, own storage: a real parameter
        ]
    )
    assert [p.name for p in naming.model_params_from_state_dict(state)] == ["wte.weight", "other.weight"]


def test_matrix_view_shape():
    assert matrix_view_shape((3, 4)) == (3, 4)
    assert matrix_view_shape(torch.Size([6, 2, 3, 3])) == (6, 18)
    assert (
        matrix_view_shape((5,)) is None
        and matrix_view_shape(()) is None
        and matrix_view_shape((0, 3)) is None
    )


def _evidence(shapes):
    return [naming.StateEvidence(exact=tuple(s)) for s in shapes]


def test_ambiguous_rules_leave_names_anonymous():
    a = naming.NameCandidate("single-group", ["x", "y"], [(4,), (4,)])
    b = naming.NameCandidate("hf-decay-rule", ["y", "x"], [(4,), (4,)])
    choice = naming.choose_names([[a, b]], _evidence([(4,), (4,)]), [2])
    assert choice.source == "anonymous" and choice.names == ["param_0", "param_1"]
    assert "different name orders" in choice.warnings[0]


def test_agreeing_rules_are_accepted_and_group_sizes_decide():
    nano = naming.NameCandidate("nanogpt-order", ["w", "b"], [(2, 2), (2,)], [1, 1])
    single = naming.NameCandidate("single-group", ["w", "b"], [(2, 2), (2,)])
    assert naming.choose_names([[nano, single]], _evidence([(2, 2), (2,)]), [1, 1]).source == "nanogpt-order"
    assert naming.choose_names([[nano, single]], _evidence([(2, 2), (2,)]), [2]).source == "single-group"


def test_one_wrong_shape_rejects_a_rule():
    c = naming.NameCandidate("single-group", ["a", "b", "c"], [(2, 3), (3,), (4, 4)])
    choice = naming.choose_names([[c]], _evidence([(2, 3), (3,), (4, 5)]), [3])
    assert choice.source == "anonymous"
    assert choice.shapes == [(2, 3), (3,), (4, 5)]  # shapes from the state, not from the rejected rule
    assert "entry 2" in choice.warnings[0]


def test_adapprox_factors_are_checked_by_matrix_view():
    c = naming.NameCandidate("single-group", ["conv"], [(6, 2, 3, 3)])
    fits = naming.choose_names([[c]], [naming.StateEvidence(matrix=(6, 18))], [1])
    assert fits.names == ["conv"] and fits.shapes == [(6, 2, 3, 3)]
    assert naming.choose_names([[c]], [naming.StateEvidence(matrix=(18, 6))], [1]).source == "anonymous"


def test_hf_model_of_another_size_gives_anonymous_names(tmp_path):
    """A model.safetensors that does not belong to the optimizer must not lend it names."""
    from safetensors.torch import save_file

    truth = make_hf_trainer(tmp_path)
    other = make_params(gpt2_spec(layers=2, embd=8, vocab=17))  # a different vocabulary size
    save_file({n: p.detach() for n, p in other.items()}, truth.path / "model.safetensors")
    ck = load_checkpoint(truth.path)
    assert ck.names_source == "anonymous"
    assert all(p.name.startswith("param_") for p in ck.params)
    assert [p.shape for p in ck.params] == truth.shapes
    assert any("no naming rule fits" in w for w in ck.warnings)


def test_hf_unknown_model_type_falls_back_to_anonymous_for_gpt2_order(tmp_path):
    """Natural sort cannot rebuild GPT-2's order (wte before h); without model_type the names stay unknown."""
    truth = make_hf_trainer(tmp_path)
    (truth.path / "config.json").write_text(json.dumps({"model_type": "something-new"}))
    ck = load_checkpoint(truth.path)
    assert ck.names_source == "anonymous"


def test_param_names_of_a_compiled_model_are_normalized(tmp_path):
    model = torch.compile(torch.nn.Linear(3, 2), backend="eager")
    opt = torch.optim.AdamW(list(model.named_parameters()))
    assert opt.state_dict()["param_groups"][0]["param_names"][0].startswith("_orig_mod.")
    model._orig_mod(torch.randn(4, 3)).sum().backward()  # same parameters, no compilation
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    ck = load_checkpoint(tmp_path / "opt.pt")
    assert ck.names_source == "param_names"
    assert [p.name for p in ck.params] == ["weight", "bias"]
