"""What ``sparselm plan`` prints: one layout in full, or a search's ranking and rejections."""

from __future__ import annotations

from sparselm.params.counting import count_params
from sparselm.params.presets import human
from sparselm.plan.planner import Plan

GIB = 2**30


def gib(n: float) -> str:
    """Bytes in GiB, or in MiB below one GiB (a laptop-sized model would read 0.00 GiB)."""
    if abs(n) < GIB:
        return f"{n / 2**20:,.2f} MiB"
    return f"{n / GIB:,.2f} GiB"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f}"


def layout_line(plan: Plan) -> str:
    cfg, m = plan.cfg, plan.measurement
    p = cfg.parallel
    parts = [m.layout.describe()]
    if p.sequence_parallel:
        parts.append("sequence_parallel")
    if p.param_dtype != "fp32":
        parts.append(f"param_dtype={p.param_dtype}")
    return ", ".join(parts)


def format_plan(plan: Plan, name: str) -> str:
    cfg, hw, m, e = plan.cfg, plan.hardware, plan.measurement, plan.estimate
    t = cfg.train
    counts = count_params(cfg)
    ckpt = "on" if m.activation_checkpointing else "off"
    other = "off" if m.activation_checkpointing else "on"
    accumulate = f"{m.micro_batches} micro-batches of {m.micro_batch_size}" if m.micro_batches > 1 else (
        f"one micro-batch of {m.micro_batch_size} (no accumulation)")  # fmt: skip
    lines = [
        f"sparselm plan: {name} on {m.layout.world_size:,} x {hw.name}",
        f"  model        {human(counts.total)} parameters ({human(counts.active)} active per token), "
        f"{cfg.model.n_layers} layers, seq {m.seq_len}, {m.precision} compute, AdamW with fp32 state",
        f"  layout       {layout_line(plan)}",
        f"  batch        {t.global_batch_size:,} sequences per step = {m.layout.dp:,} data-parallel ranks x "
        f"{accumulate}",
        "",
        "memory per device (rank 0)",
        f"  parameters                              {gib(m.state['params']):>16}",
        f"  gradients                               {gib(m.state['grads']):>16}",
        f"  optimizer state                         {gib(m.state['optimizer']):>16}",
        f"  model state at its peak                 {gib(m.state['total']):>16}   (end of forward, backward, "
        "reduction or step)",
        f"  activations, one micro-batch            {gib(m.activations[ckpt]):>16}   (checkpointing {ckpt}; "
        f"{other}: {gib(m.activations[other])})",
        f"  peak of all tensors in the step         {gib(m.peak[ckpt]):>16}   (checkpointing {other}: "
        f"{gib(m.peak[other])})",
        f"  usable on the device                    {gib(e.usable_bytes):>16}   ({hw.usable_fraction:.0%} of "
        f"{hw.memory_gib:g} GiB)",
        "  " + fit_sentence(plan),
        "",
        "collectives per step (rank 0; bytes per step, wire = sent with ring algorithms)",
        f"  {'kind':<15}{'group':<16}{'ranks':>6}{'nodes':>7}  {'when':<12}{'calls':>8}{'GiB':>11}"
        f"{'wire GiB':>11}{'link':>16}{'ms':>10}",
    ]
    for ct in sorted(e.collectives, key=lambda ct: -ct.seconds):
        c = ct.collective
        lines.append(
            f"  {c.kind:<15}{c.group:<16}{len(c.ranks):>6}{ct.nodes:>7}  {c.phase:<12}{c.calls:>8,.0f}"
            f"{c.volume / GIB:>11,.2f}{c.wire / GIB:>11,.2f}{ct.link:>16}{_ms(ct.seconds):>10}"
            + ("  (overlapped)" if ct.overlapped else "")
        )
    if not e.collectives:
        lines.append("  none (one rank, or every group has one rank)")
    lines += [
        "",
        f"step time estimate on {hw.key}",
        f"  compute                 {_ms(e.compute_s):>16} ms",
        f"  communication, exposed  {_ms(e.exposed_comm_s):>16} ms",
        f"  communication, overlapped with compute {_ms(e.overlapped_comm_s)} ms (shows only beyond the compute)",
        f"  step                    {_ms(e.step_s):>16} ms  = {e.tokens_per_s:,.0f} tokens/s, "
        f"{e.samples_per_s:,.1f} samples/s",
        f"  per device              {e.model_tflops_per_device:,.1f} model TFLOP/s (MFU {e.mfu:.1%}), "
        f"{e.hardware_tflops_per_device:,.1f} TFLOP/s run (recomputation included)",
        "assumptions",
        *[f"  - {a}" for a in e.assumptions],
        "",
        _footer(plan),
    ]
    return "\n".join(lines)


def fit_sentence(plan: Plan) -> str:
    m, e = plan.measurement, plan.estimate
    margin = e.usable_bytes - m.peak_bytes
    close = " (close, and the peak was extended from shallow copies: check with --full)" if (
        plan.extrapolated_from and abs(margin) < 0.05 * e.usable_bytes) else ""  # fmt: skip
    if e.fits:
        return f"fits: {gib(margin)} to spare{close}"
    return f"does NOT fit: {gib(-margin)} short{close}"


def _footer(plan: Plan) -> str:
    m = plan.measurement
    how = "every layer"
    if plan.extrapolated_from:
        a, b = plan.extrapolated_from
        how = f"copies {a} and {b} layers deep, extended to {plan.cfg.model.n_layers} (--full runs every layer)"
    return (
        f"dry run: three training steps of rank 0 on fake tensors ({how}) in {m.seconds:.1f} s; "
        f"{m.unknown_scalars} loss/norm values unknown on fake tensors were taken as 0"
    )


def format_search(result, name: str, top: int) -> str:
    hw = result.hardware
    ranked, rejected = result.ranked, result.rejected
    too_big = [t for t in rejected if t.plan is not None or "GiB per device" in t.reason]
    invalid = [t for t in rejected if t not in too_big]
    lines = [
        f"sparselm plan --search: {name} on {result.world_size:,} x {hw.name}",
        f"  {len(ranked) + len(too_big)} layouts sized ({result.measured} dry runs), {len(invalid)} refused by the "
        f"launcher's checks; {len(ranked)} fit",
        "",
    ]
    if ranked:
        lines.append(f"  {'#':>3}  {'layout':<62}{'peak GiB':>10}{'step s':>9}{'tokens/s':>16}{'MFU':>7}")
        for i, t in enumerate(ranked[:top], 1):
            m, e = t.plan.measurement, t.plan.estimate
            lines.append(
                f"  {i:>3}  {t.label():<62}{m.peak_bytes / GIB:>10,.1f}{e.step_s:>9,.2f}{e.tokens_per_s:>12,.0f}"
                f"{e.mfu:>7.1%}"
            )
        if len(ranked) > top:
            lines.append(f"  ... and {len(ranked) - top} more that fit (--top to see them)")
    else:
        lines.append("  no layout fits")
    if too_big:
        lines += ["", "does not fit (smallest micro batch of each layout and checkpointing setting):"]
        for t in too_big:
            lines.append(f"  {t.label():<62}{t.reason}")
    if invalid:
        lines += ["", "refused by the launcher (the error `sparselm train` would stop with):"]
        by_reason: dict[str, list[str]] = {}
        for t in invalid:
            by_reason.setdefault(t.reason, []).append(t.label().rsplit(" micro=", 1)[0])
        for reason, labels in by_reason.items():
            shown = "; ".join(labels[:3]) + (f"; and {len(labels) - 3} more" if len(labels) > 3 else "")
            lines.append(f"  {reason}  [{shown}]")
    return "\n".join(lines)
