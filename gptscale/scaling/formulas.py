"""The published formulas the estimator stands on, each in its own function with its source.

Pure arithmetic on numbers (no config, no torch), so each can be checked against a hand
computation or a paper's table. `estimate.py` combines them with gptscale's own exact
accounting (parameter tensors per rank, DeepSpeed's buffers).
"""
from __future__ import annotations

RECOMPUTE = ("none", "selective", "full")


def korthikanti_layer_activation_bytes(s: int, b: int, h: int, a: int, t: int = 1,
                                       sequence_parallel: bool = False, recompute: str = "none") -> float:
    """Activation bytes one transformer layer stores for backward, per micro-batch, with
    16-bit activations and dropout (GPT-3 shape: 4h MLP, GELU, LayerNorm, softmax stored).

    Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
    Table 2 (s sequence, b micro-batch, h hidden, a heads, t tensor-parallel size):
      no parallelism                          sbh (34 + 5as/h)
      tensor parallel                         sbh (10 + 24/t + 5as/(ht))
      tensor + sequence parallel              sbh (34/t + 5as/(ht))
      tensor parallel + selective recompute   sbh (10 + 24/t)
      tensor + sequence + selective           sbh (34/t)
      full recompute                          2sbh (the layer's input; /t with sequence parallel)
    """
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute={recompute!r}; one of {RECOMPUTE}")
    sbh = s * b * h
    if recompute == "full":
        return 2 * sbh / (t if sequence_parallel else 1)
    attention_core = 0.0 if recompute == "selective" else 5 * a * s / (h * t)
    if sequence_parallel:
        return sbh * (34 / t + attention_core)
    return sbh * (10 + 24 / t + attention_core)


def training_flops_per_token(matmul_params: int, n_layer: int, n_head: int, head_dim: int, seq_len: int) -> float:
    """Model FLOPs per token of a training step (forward + backward): 6N + 12·L·H·Q·T.

    Chowdhery et al. 2022 (PaLM), Appendix B: N matmul parameters, L layers, H heads of size
    Q, context T; the attention term counts the QK^T and AV products at full (non-causal) cost.
    """
    return 6.0 * matmul_params + 12.0 * n_layer * n_head * head_dim * seq_len


def hardware_flops_per_token(matmul_params: int, n_layer: int, n_head: int, head_dim: int, seq_len: int,
                             recompute: str) -> float:
    """FLOPs the hardware executes per token, recomputation included.

    Full recompute runs every layer's forward twice: 8N + 16·L·H·Q·T (Narayanan et al. 2021,
    "Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM", eq. 3:
    96·B·s·l·h² (1 + s/(6h) + V/(16lh)) per iteration is the 4x-forward count). Selective
    recompute repeats only the attention core's forward, QK^T and AV: + 4·L·H·Q·T
    (Korthikanti et al. 2022, section 5).
    """
    model = training_flops_per_token(matmul_params, n_layer, n_head, head_dim, seq_len)
    attention_forward = 4.0 * n_layer * n_head * head_dim * seq_len
    if recompute == "full":
        return model + 2.0 * matmul_params + attention_forward
    if recompute == "selective":
        return model + attention_forward
    return model


def narayanan_training_days(tokens: float, params: float, devices: int, achieved_tflops: float) -> float:
    """End-to-end training time ≈ 8·T·P / (n·X) (Narayanan et al. 2021, eq. 4: T tokens, P
    parameters, n devices, X achieved FLOP/s per device counting the recomputed forward)."""
    return 8 * tokens * params / (devices * achieved_tflops * 1e12) / 86400


def pipeline_bubble_fraction(stages: int, micro_batches: int, virtual_stages: int = 1) -> float:
    """Share of a step the average device idles in the pipeline's fill and drain.

    1F1B / GPipe: (p - 1) / (m + p - 1) of the step (Narayanan et al. 2021, section 2.2.1:
    bubble time (p - 1)(t_f + t_b) against m(t_f + t_b) of work). Interleaved 1F1B with v
    model chunks per device divides the bubble time by v (section 2.2.2):
    ((p - 1)/v) / (m + (p - 1)/v).
    """
    bubble = (stages - 1) / virtual_stages
    return bubble / (micro_batches + bubble)


def one_f_one_b_warmup(stages: int, stage: int, micro_batches: int, virtual_stages: int = 1) -> int:
    """Forwards stage `stage` runs before its first backward in 1F1B: p - s - 1 (Narayanan et
    al. 2021, 2.2.1); interleaved over v chunks, (p - s - 1)·2 + (v - 1)·p chunk forwards
    (Megatron-LM's schedule); at most the step's m·v. One more is in flight at the first
    backward, so a stage keeps min(warm-up + 1, m·v) chunks' activations at its peak."""
    p, s, m, v = stages, stage, micro_batches, virtual_stages
    if v == 1:
        return min(p - s - 1, m)
    return min((p - s - 1) * 2 + (v - 1) * p, m * v)


def ring_bytes_sent(kind: str, size_bytes: float, ranks: int) -> float:
    """Bytes each rank sends in a ring collective over `ranks` (Thakur et al. 2005; NCCL's
    algorithm bandwidth): all-gather / reduce-scatter of a whole of S bytes: S (n-1)/n;
    all-reduce: 2 S (n-1)/n."""
    if ranks <= 1:
        return 0.0
    factor = {"all_gather": 1, "reduce_scatter": 1, "all_reduce": 2}[kind]
    return factor * size_bytes * (ranks - 1) / ranks

