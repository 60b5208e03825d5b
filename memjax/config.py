"""Helpers for config files: `get_config(arg)` argument parsing and config <-> dict conversion."""

import ast

import ml_collections


def parse_arg(arg: str | None, **defaults) -> dict:
    """Parses the `:`-argument of a config file, e.g. `"model=deltanet,smoke"`.

    Each comma-separated item is `key=value` (value parsed as a Python literal when it is one,
    otherwise kept as a string) or a bare `key`, which sets a boolean default to True.
    Only keys present in `defaults` are accepted, so a typo is an error naming the key.
    """
    values = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, has_value, raw = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; known: {', '.join(sorted(defaults))}")
        if not has_value:
            if not isinstance(defaults[key], bool):
                raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
            values[key] = True
            continue
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        if isinstance(defaults[key], bool) and not isinstance(value, bool):
            raise ValueError(f"config argument {key!r} is a flag; got {raw!r}")
        values[key] = value
    return values


def to_dict(config) -> dict:
    """A plain nested dict (tuples kept) of a ConfigDict, for JSON files and comparisons."""
    if isinstance(config, ml_collections.ConfigDict):
        return {k: to_dict(v) for k, v in config.items()}
    return config


def load_config(spec: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
    """Loads `path/to/config.py[:arg]` as `scripts/train.py --config` does (locked), then
    applies `overrides` (`{"train.steps": 5}`); an unknown key or a wrong type raises."""
    import importlib.util

    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_memjax_config", path)
    if module_spec is None:
        raise FileNotFoundError(f"no config file at {path!r}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    config.lock()
    for key, value in (overrides or {}).items():
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        setattr(node, leaf, value)
    return config


# Presets that are a registered mixer with some options changed (`model=<preset>` in configs).
MIXER_PRESETS = {
    "sliding_window": ("attention", {"window": 16}),
    # The sliding-window attention layer of hybrid stacks (e.g. model=swa+gated_deltanet).
    "swa": ("attention", {"window": 64}),
    # Based (Arora et al. 2024) comes three ways: `based` alone (no preset: Taylor linear
    # attention, no window) is the Based of Zoology's MQAR figures; `based_lm` is one mixer that
    # sums Taylor linear attention and a 64-token softmax window (every layer alike); the paper's
    # language-model layout, where separate layers do the two and gated short convolutions do
    # most of the rest, is the pattern LAYER_PATTERNS["based_published"].
    "based_lm": ("based", {"window": 64}),
    # Delta rule with beta in (0, 2): state-transition eigenvalues in (-1, 1], needed for parity.
    "deltanet_neg": ("deltanet", {"allow_neg_eigval": True}),
    "gated_deltanet_neg": ("gated_deltanet", {"allow_neg_eigval": True}),
    # Selective SSMs with two state channels (Mamba) / heads (Mamba-2) fixed at decay 1 and 0
    # (Wang et al. 2025), and Mamba started close to linear attention (Trockman et al. 2024).
    "mamba_polarized": ("mamba", {"polarized": True}),
    "mamba_mimetic": ("mamba", {"initialization": "mimetic"}),
    # head_dim 8: even the smoke size (d_model 16, 4 heads) keeps learned heads beside the two
    # fixed ones. Its unpolarized twin: model=mamba2 --config.model.mixer.head_dim=8.
    "mamba2_polarized": ("mamba2", {"polarized": True, "head_dim": 8}),
    # Test-time memories (memjax.layers.neural_memory; `lmm` has a matrix memory): Titans' LMM
    # with its depth-2 MLP memory (max_lr 0.1: it diverged at 1.0); ATLAS (Muon, an Omega window
    # of 4, degree-2 polynomial features, depth-2 MLP memory); ATLAS's DeepTransformer (Hebbian
    # loss on exp-kernel features: linear attention with exp features) and Dot (the Omega rule
    # on them). MAL is a pattern: model=lmm+swa.
    "lmm_mlp": ("lmm", {"architecture": "mlp", "max_lr": 0.1}),
    "atlas": ("lmm", {"architecture": "mlp", "max_lr": 0.1, "optimizer": "muon",
                      "omega_window": 4, "feature_map": "polynomial", "feature_degree": 2}),
    "deep_transformer": ("lmm", {"architecture": "linear", "loss": "dot", "momentum": False,
                                 "feature_map": "polynomial", "feature_degree": 2}),
    # max_lr 0.1: the Omega rule sums 4 tokens' l2 gradients on features of squared norm ~2.3,
    # so theta * curvature reaches ~18 theta; at the default 1.0 the inner loop diverged at
    # initialisation (NaN at step 2 of MQAR).
    "dot": ("lmm", {"architecture": "linear", "omega_window": 4, "feature_map": "polynomial",
                    "feature_degree": 2, "max_lr": 0.1}),
}


# Named per-layer patterns (`model=<name>` in configs), expanded to the pattern string.
LAYER_PATTERNS = {
    # Based's language models (Arora et al. 2024, "Simple linear attention language models
    # balance the recall-throughput tradeoff"): mostly BaseConv gated short convolutions (kernel
    # 3, expansion 4), a Taylor linear-attention layer every 5th layer, each followed by a
    # small sliding-window softmax attention layer (window 64 in the paper's text, `swa`; the
    # released configs use 256: --config.model.mixers.swa.window=256). num_layers must be a
    # multiple of 5.
    "based_published": "based+swa+base_conv+base_conv+base_conv",
}


def mixer_config(model: str) -> ml_collections.ConfigDict:
    """`config.model.mixer` for a registered mixer or a preset: its name and every option."""
    from memjax.layers import mixer_options

    name, overrides = MIXER_PRESETS.get(model, (model, {}))
    return ml_collections.ConfigDict({"name": name, **(mixer_options(name) | overrides)})


def lm_config(vocab_size, d_model: int, model: str, num_layers: int = 2) -> ml_collections.ConfigDict:
    """`config.model` of the language-model backbone used by the synthetic tasks.

    `model`: a mixer or preset for every layer (`config.model.mixer`), or a per-layer pattern
    of them joined by "+" (`model=swa+gated_deltanet`: `config.model.layers`, repeated to
    `num_layers`, with each kind's options under `config.model.mixers.<kind>`; `mixer` is then
    None), or the name of such a pattern in LAYER_PATTERNS (`model=based_published`; its length
    must divide `num_layers`). `vocab_size` may be a FieldReference shared with `config.task`. No MLP (Zoology's
    MQAR models use an identity "state mixer"), a width-4 short convolution in front of mixers
    that have none of their own, no position embedding.
    """
    from memjax.models.lm import layer_kinds

    model = LAYER_PATTERNS.get(model, model)
    kinds = layer_kinds(model)
    model_cfg = ml_collections.ConfigDict()
    model_cfg.name = "lm"
    model_cfg.vocab_size = vocab_size
    model_cfg.d_model = d_model
    model_cfg.num_layers = num_layers
    hybrid = len(kinds) > 1
    model_cfg.mixer = None if hybrid else mixer_config(model)
    model_cfg.layers = "+".join(kinds) if hybrid else ""
    model_cfg.mixers = ml_collections.ConfigDict(
        {kind: mixer_config(kind) for kind in kinds} if hybrid else {})
    model_cfg.short_conv = 4
    model_cfg.stack_short_convs = False  # True: also in front of mixers with their own (ablation)
    # True: nn.scan over the repeating blocks (compile time flat in depth; stacked parameter
    # layout, so checkpoints do not carry over between True and False). memjax.models.lm.
    model_cfg.scan_layers = False
    # Recompute block activations in the backward pass: "none", "full", "dots_saveable",
    # "nothing_saveable", "dots_with_no_batch_dims_saveable" (memjax.models.lm.REMAT_POLICIES).
    model_cfg.remat = "none"
    model_cfg.mlp_ratio = 0.0
    model_cfg.norm = "layernorm"
    model_cfg.pos_emb = "none"
    model_cfg.max_len = 0
    model_cfg.tie_embeddings = True
    model_cfg.init = "reference"  # memjax.layers.initializers: "reference" or "flax" (ablation)
    return model_cfg


def train_config(steps: int = 3_000, lr: float = 3e-3) -> ml_collections.ConfigDict:
    """`config.train`: AdamW with warm-up and cosine decay, evaluation, checkpoints, early stop."""
    train = ml_collections.ConfigDict()
    train.steps = steps
    train.optimizer = "adamw"
    train.lr = lr
    train.warmup_steps = 100
    train.weight_decay = 0.1
    # Parameter classes without weight decay (memjax.layers.initializers.PARAMETER_CLASSES).
    train.weight_decay_exempt = "bias,norm,dynamics"
    # Classes that get Adam, not Muon, when optimizer = "muon" (Muon only on 2-D hidden matrices).
    train.muon_exempt = "embedding,head,conv,bias,norm,dynamics"
    # Weights of losses layers sow (`self.sow("losses", name, ...)`): "name=weight,..."; 1.0 if unnamed.
    train.aux_loss_weights = ""
    # Micro-batches per step: gradients summed over k slices of the batch, one update (the
    # batch must split into k slices, each divisible by the batch devices mesh.data x mesh.fsdp).
    train.grad_accum_steps = 1
    # "bfloat16": forward and backward on a bfloat16 copy of the float32 parameters (the
    # parameters, gradients and optimizer state stay float32; the loss is computed in float32).
    train.compute_dtype = "float32"
    train.b1 = 0.9
    train.b2 = 0.98
    train.grad_clip = 1.0
    train.log_every = 50
    train.eval_every = 250
    train.checkpoint_every = 250
    train.keep_checkpoints = 3
    train.target_accuracy = 0.99  # early stop once pooled test accuracy reaches it; 0 = off
    train.progress_bar = True
    # An unreadable latest checkpoint: False stops, naming the newest readable one; True resumes
    # from that one (moving the unreadable ones to <workdir>/unreadable_checkpoints) with a warning.
    train.restore_fallback = False
    return train


def mesh_config() -> ml_collections.ConfigDict:
    """`config.mesh`: the size of each mesh axis (`memjax.train.mesh`); one may be -1 (the
    devices the others leave). `data` splits the batch; `fsdp` splits the batch and the large
    weights with their optimizer state; `tensor` splits the mixers' heads
    (`memjax.train.sharding`). A config with only `data` (older ones) reads fsdp = tensor = 1."""
    return ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})


def make_smoke(config: ml_collections.ConfigDict) -> None:
    """Shrinks `config.model` and `config.train` in place to a seconds-long run (for tests)."""
    config.model.d_model = 16
    config.train.steps = 20
    config.train.warmup_steps = 5
    config.train.log_every = 5
    config.train.eval_every = 10
    config.train.checkpoint_every = 10
    config.train.target_accuracy = 0.0
    config.train.progress_bar = False
