"""Recipes as reviewable artefacts: where each key comes from (`effitrain diff`, `effitrain explain`) and lock files
of every recipe's resolved config (`effitrain lock`)."""

from __future__ import annotations

from conftest import REPO, effitrain_cli
from effitrain.config.tree import group_options
from effitrain.config.generated import expected, stale_generated
from effitrain.config.lock import lock_dir, resolved_text, stale_locks, write_locks
from effitrain.config.provenance import diff, explain, format_diff, provenance


def test_diff_of_two_recipes_names_exactly_the_keys_they_change_and_who_set_them():
    # recipes/wsd.yaml: `override /scheduler: wsd` and decay_fraction 0.1, decay_shape exp (warmup_steps 20 and
    # min_lr_ratio 0.1 equal cosine's); recipes/baseline.yaml chooses adamw and cosine and sets nothing else
    rows, a, b = diff("baseline", "wsd")
    assert (a, b) == ("baseline", "wsd")
    assert [(r.key, r.a, r.a_source, r.b, r.b_source) for r in rows] == [
        ("scheduler.decay_fraction", "<unset>", "(not set by any layer)", 0.1, "recipes/wsd.yaml"),
        ("scheduler.decay_shape", "<unset>", "(not set by any layer)", "exp", "recipes/wsd.yaml"),
        ("scheduler.name", "cosine", "configs/scheduler/cosine.yaml (chosen by recipe baseline)",
         "wsd", "configs/scheduler/wsd.yaml (chosen by recipe wsd)"),
    ]
    table = format_diff(rows, a, b, "markdown").splitlines()
    assert table[0] == "| key | baseline | set by | wsd | set by |" and len(table) == 2 + 3
    assert table[4] == ("| `scheduler.name` | `'cosine'` | configs/scheduler/cosine.yaml (chosen by recipe baseline) | "
                        "`'wsd'` | configs/scheduler/wsd.yaml (chosen by recipe wsd) |")


def test_diff_sides_may_be_stacks_override_lists_and_shared_overrides_apply_to_both():
    rows, _, _ = diff("default", "optimizer=galore optimizer.lr=1e-3", ["train.max_steps=7"])
    by_key = {r.key: r for r in rows}
    assert by_key["optimizer.lr"].b == 0.001 and by_key["optimizer.lr"].b_source == "command line: optimizer.lr=1e-3"
    assert by_key["optimizer.name"].b_source == "configs/optimizer/galore.yaml (chosen by command line)"
    assert "train.max_steps" not in by_key  # shared by both sides
    stacked, _, _ = diff("galore", "galore+lisa")
    assert {r.b_source for r in stacked if r.key.startswith("methods.lisa")} == {"recipes/lisa.yaml"}


def test_explain_shows_the_block_default_the_recipe_and_the_override_in_order():
    text = explain("optimizer.lr", ["+recipe=galore", "optimizer.lr=1e-3"]).splitlines()
    assert text == ["optimizer.lr = 0.001",
                    "  1. configs/optimizer/galore.yaml (chosen by recipe galore): 0.01",
                    "  2. recipes/galore.yaml: 0.01",
                    "  3. command line: optimizer.lr=1e-3: 0.001   <- wins"]


def test_a_run_level_override_is_the_provenance_of_every_stage_it_shortens():
    p = provenance(["+recipe=g_stack", "train.max_steps=7"])
    assert p.values["stages.1.train.max_steps"] == 7
    assert p.chain("stages.1.train.max_steps") == [("recipes/g_stack.yaml", 200),
                                                   ("command line: train.max_steps=7", 7)]
    assert p.source("stages.1.transform.factor") == "recipes/g_stack.yaml"


def test_a_deleted_key_is_attributed_to_its_tilde_override():
    p = provenance(["+recipe=lisa", "~methods.lisa"])
    assert "methods.lisa.interval" not in p.values
    assert p.source("methods.lisa.interval") == "command line: ~methods.lisa"


def test_bad_input_is_one_line_with_exit_2(tmp_path):
    (tmp_path / "not-a-run").mkdir()
    for args, message in [(["diff", "baseline", "wsdd"], "unknown recipe 'wsdd' (did you mean 'wsd'?)"),
                          (["diff", "baseline", str(tmp_path / "not-a-run")], "holds no run (no config.yaml)"),
                          (["diff", "baseline"], "diff: name two sides"),
                          (["explain", "optimizer.lrr", "+recipe=galore"], "no key 'optimizer.lrr' in this config "
                                                                           "(did you mean 'optimizer.lr'?)"),
                          (["lock", "wsdd"], "unknown recipe 'wsdd'")]:
        result = effitrain_cli(*args, timeout=120)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_every_lock_file_and_generated_doc_is_current():
    """recipes/locked/NAME.yaml holds each recipe's resolved config, and each card's generated block and
    docs/compatibility.md come from the code; a change to a block default, a recipe or a rule must come with the files
    it changes (run `effitrain lock`), so that the pull request shows every affected recipe."""
    problems = stale_locks()
    assert not problems, (f"lock files not current: {', '.join(f'{n} ({why})' for n, why in sorted(problems.items()))}"
                          f"; run 'effitrain lock' and commit {lock_dir()}")
    assert len(list(lock_dir().glob("*.yaml"))) == len(group_options("recipe"))
    stale = stale_generated()
    assert not stale, f"generated docs not current: {', '.join(map(str, stale))}; run 'effitrain lock' and commit them"


def test_a_stale_card_block_is_named_and_the_hand_written_text_kept(tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "results").mkdir()   # the card's reproduction row comes from the recipe's results file
    (tmp_path / "results" / "wsd.json").write_text((REPO / "docs" / "results" / "wsd.json").read_text())
    original = (REPO / "docs" / "recipes" / "wsd.md").read_text()
    card = tmp_path / "recipes" / "wsd.md"
    card.write_text(original.replace("| `scheduler.decay_shape` | `'exp'` |", "| `scheduler.decay_shape` | `'x'` |"))
    assert stale_generated(["wsd"], docs=tmp_path) == [card]
    regenerated = expected(["wsd"], docs=tmp_path)[card]
    assert regenerated == original and "## Paper vs this recipe" in regenerated  # the hand-written part is kept
    card.write_text(original.split("<!-- generated:start -->")[0] + original.split("<!-- generated:end -->\n")[1])
    assert expected(["wsd"], docs=tmp_path)[card] == original  # a card without a block gets it under its title


def test_the_matrix_cells_are_the_rules_verdicts():
    from effitrain.config.generated import VARIANTS, recipe_matrix_row

    columns = [v[0] for v in VARIANTS]
    galore = dict(zip(columns, recipe_matrix_row("galore")))
    assert galore["ZeRO-3"] == "galore_needs_2d_gradients" and galore["CPU"] == galore["GPU bf16"] == "ok"
    spectral = dict(zip(columns, recipe_matrix_row("sparse_spectral")))
    assert spectral["GPU bf16"] == spectral["ZeRO-2"] == "sparse_spectral_rewrites_its_factors"
    # every refusing rule, sorted: the same whatever order the rule modules were imported in
    coat = dict(zip(columns, recipe_matrix_row("coat")))
    assert coat["CPU"] == "fp8_needs_sm89" and coat["ZeRO-3"] == "fp8_not_with_zero3"


def test_a_stale_lock_file_is_named(tmp_path):
    write_locks(["wsd", "galore"], folder=tmp_path)
    assert stale_locks(["wsd", "galore"], folder=tmp_path) == {}
    text = (tmp_path / "wsd.yaml").read_text()
    (tmp_path / "wsd.yaml").write_text(text.replace("decay_shape: exp", "decay_shape: linear"))
    assert stale_locks(["wsd", "galore", "lisa"], folder=tmp_path) == {"wsd": "stale", "lisa": "missing"}
    assert "decay_shape: exp" in resolved_text("wsd") and "run_dir" not in resolved_text("wsd")
    assert write_locks(["wsd", "galore"], folder=tmp_path) == ["wsd"]  # only what changed is rewritten


def test_the_inputs_digest_changes_with_any_input(tmp_path, monkeypatch):
    """`lock --check` answers at once when nothing the lock files and generated docs are computed from has changed;
    the digest must therefore move with any of those inputs."""
    from effitrain.config import lock

    card = tmp_path / "card.md"
    card.write_text("# a card\n")
    monkeypatch.setattr(lock, "_DOCS", (*lock._DOCS, str(card)))
    before = lock.inputs_digest()
    assert lock.inputs_digest() == before                  # deterministic
    card.write_text("# a card, edited\n")
    assert lock.inputs_digest() != before
