"""The sequence family: ``ctc_loss`` (Connectionist Temporal Classification) with PyTorch
2.13's semantics.

The kernels take float64 log-probabilities as ``(T, N, C)`` (an unbatched ``(T, C)`` input is one
sample of a ``(T, 1, C)`` one), the targets as one flat int64 array with each sample's
offset into it (padded ``(N, S)`` targets start at ``n * S``, concatenated ones where the
previous sample's end), and the lengths as int64 arrays. Targets and lengths are checked
on the host: they are small, and the error must name the bad value.
"""

from __future__ import annotations

import numpy as np

from lossforge import KernelSpec, LossSpec, Prepared, dispatch, hookimpl, validate

_DOC = """Connectionist Temporal Classification loss (Graves et al., 2006), as
    ``torch.nn.functional.ctc_loss``.

    For sample ``n`` with target ``l`` of length ``L`` and ``T_n = input_lengths[n]`` frames,
    ``loss_n = -log sum_{pi in B^-1(l)} prod_{t < T_n} exp(log_probs[t, n, pi_t])``, where
    ``B`` removes repeated labels, then blanks, from an alignment ``pi``. It is computed by
    the forward recursion over the extended labels ``l' = (blank, l_1, blank, ..., l_L,
    blank)`` in log space (float64 whatever the input's dtype):
    ``alpha_t(s) = log_probs[t, l'_s] + logsumexp(alpha_{t-1}(s), alpha_{t-1}(s-1),
    alpha_{t-1}(s-2) if l'_s != blank and l'_s != l'_{s-2})``,
    ``loss_n = -logsumexp(alpha_{T_n-1}(2L), alpha_{T_n-1}(2L-1))``. A target that no
    alignment of ``T_n`` frames can emit has loss ``inf`` (0, with a zero gradient, under
    ``zero_infinity=True``); no frame at all (``T_n = 0``) emits only the empty target.

    Reductions: ``"none"`` gives the ``(N)`` losses (a scalar array, unbatched); ``"sum"``
    their sum; ``"mean"`` is PyTorch's: each loss divided by its target length (clamped to
    1), then averaged over the batch. ``partial`` gives the mean's pair: (the sum of the
    divided losses, N).

    Gradient: PyTorch's, not the derivative of the formula with respect to free
    log-probabilities. With ``beta`` the backward recursion,
    ``grad[t, n, c] = g_n (exp(log_probs[t, n, c]) - sum_{s: l'_s = c} exp(alpha_t(s) +
    beta_t(s) + loss_n - log_probs[t, n, c]))`` for ``t < T_n``, 0 after: the derivative with
    respect to the logits ``log_probs`` came from through ``log_softmax`` (the
    ``exp(log_probs)`` term is what a softmax's Jacobian adds), the gradient PyTorch's
    native backward returns and autograd passes on. ``g_n`` is ``grad_output`` (per sample
    for ``"none"``) divided, for ``"mean"``, by ``N`` and the target length. An infinite loss
    gives a nan gradient (as PyTorch) unless ``zero_infinity``. No Hessian.

    Shape:
        log_probs: (T, N, C) or (T, C) unbatched: log-probabilities (e.g. ``log_softmax``
            over C), float.
        targets: (N, S) padded, or (sum(target_lengths)) concatenated; (S) unbatched. Any
            integer dtype; the first ``target_lengths[n]`` ids of each sample must be in
            ``[0, C)`` (checked: an ``IndexError`` naming the id, where PyTorch's CPU path
            reads out of bounds). An id equal to ``blank`` is taken as PyTorch takes it.
        input_lengths: (N), or () or (1) unbatched: an array, tuple or list of ints in
            ``[0, T]``.
        target_lengths: (N) or () unbatched, ints ``>= 0``, at most ``S`` for padded
            targets, summing to the concatenated targets' length.
        Output: a scalar for "mean" and "sum"; (N) (or ()) for "none".

    On CUDA, the four arrays must all be device arrays (the targets and lengths are copied
    to the host for the checks). ``lossforge.dask`` does not split it (its arrays have no
    common shape to chunk along).
"""


def _host(value, backend):
    """A small array argument (targets, lengths) as a NumPy array."""
    if backend == "cuda" and dispatch.on_device(value):
        return dispatch.cuda_runtime().to_host(dispatch.cuda_runtime().as_device_array(value))
    return np.asarray(value)


def _integers(name, value, backend):
    array = _host(value, backend)
    if array.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {array.dtype.name}")
    return validate.as_index(name, array, "cpu")


def _lengths(name, value, batch, batched, backend):
    array = _integers(name, value, backend)
    if array.shape != (batch,) and (batched or array.shape != ()):
        shape = f"({batch},)" if batched else "() or (1,)"
        raise ValueError(
            f"{name} must have shape {shape} (one per sample of log_probs), got {array.shape}"
        )
    return array.reshape(batch)


def _prepare(arrays, options, backend):
    blank = validate.check_int("blank", options["blank"])
    zero_infinity = validate.check_bool("zero_infinity", options["zero_infinity"])
    x = validate.as_array(arrays[0], backend)
    input_dtype = validate.float_dtype("log_probs", x)
    _, result = validate.compute_dtype(input_dtype)
    # float64 whatever the input: the recursions are float64 anyway, and a float32 input's
    # conversion (and its gradient's) costs ~1% of the kernel, which then compiles for one
    # dtype instead of two
    dtype = np.dtype(np.float64)
    if x.ndim not in (2, 3):
        raise ValueError(
            f"log_probs must have shape (T, N, C), or (T, C) unbatched, got {tuple(x.shape)}"
        )
    batched = x.ndim == 3
    steps, classes = x.shape[0], x.shape[x.ndim - 1]  # (the simulator takes no -1)
    batch = x.shape[1] if batched else 1
    if not 0 <= blank < classes:
        raise ValueError(f"blank must be in [0, {classes}) (a class of log_probs), got {blank}")
    il = _lengths("input_lengths", arrays[2], batch, batched, backend)
    tl = _lengths("target_lengths", arrays[3], batch, batched, backend)
    t = _integers("targets", arrays[1], backend)
    starts = np.zeros(batch, np.int64)  # where each sample's ids start, concatenated
    starts[1:] = np.cumsum(tl)[:-1]
    if il.size and (il.min() < 0 or il.max() > steps):
        bad = il[(il < 0) | (il > steps)][0]
        raise ValueError(f"input_lengths must be in [0, {steps}] (T of log_probs), got {bad}")
    if tl.size and tl.min() < 0:
        raise ValueError(f"target_lengths must be >= 0, got {tl[tl < 0][0]}")
    if batched and t.ndim == 2:  # padded
        if t.shape[0] != batch:
            raise ValueError(
                f"padded targets must have shape (N, S) with N = {batch} (log_probs' batch), "
                f"got {t.shape}"
            )
        width = t.shape[1]
        offsets = np.arange(batch, dtype=np.int64) * width
    elif t.ndim == 1:  # concatenated; or one unbatched target
        width = t.size if not batched else None
        offsets = starts
        if batched and tl.sum() != t.size:
            raise ValueError(
                f"concatenated targets must hold sum(target_lengths) = {tl.sum()} ids, got {t.size}"
            )
    else:
        expected = "(N, S) or (sum(target_lengths))" if batched else "(S)"
        raise ValueError(f"targets must have shape {expected}, got {t.shape}")
    if width is not None and tl.size and tl.max() > width:
        raise ValueError(
            f"target_lengths must be at most {width} (the targets' length S), got {tl.max()}"
        )
    t = t.reshape(-1)
    # the ids in use: offsets[n] + 0 .. target_lengths[n] - 1 of each sample
    used = t[np.repeat(offsets - starts, tl) + np.arange(tl.sum())]
    bad = (used < 0) | (used >= classes)
    if bad.any():
        raise IndexError(
            f"target {used[bad][0]} is out of bounds: target ids must be in [0, {classes})"
        )
    lp = validate.as_float("log_probs", x, dtype, backend).reshape(steps, batch, classes)
    return Prepared(
        arrays=(lp, t, offsets, il, tl),
        params={"blank": blank, "zero_infinity": zero_infinity},
        reduction=options["reduction"],
        denominator=float(batch),
        value_shape=(batch,) if batched else (),
        grad_shapes=(tuple(x.shape),),
        dtype=dtype,
        result_dtypes=(result, input_dtype),
        backend=backend,
    )


def _reference(
    log_probs, targets, input_lengths, target_lengths, blank=0, zero_infinity=False, **_
):
    """float64 per-sample losses: the forward recursion over the extended labels, one time
    step at a time on whole NumPy rows."""
    lp = np.asarray(log_probs, np.float64)
    batched = lp.ndim == 3
    if not batched:
        lp = lp[:, None]
    t = np.asarray(targets)
    il = np.atleast_1d(input_lengths)
    tl = np.atleast_1d(target_lengths)
    flat = t.reshape(-1)
    losses = []
    for n in range(lp.shape[1]):
        length = int(tl[n])
        start = int(tl[:n].sum())
        labels = t[n, :length] if t.ndim == 2 else flat[start : start + length]
        ext = np.full(2 * length + 1, blank)
        ext[1::2] = labels
        skip = np.zeros(ext.size, bool)
        skip[2:] = (ext[2:] != blank) & (ext[2:] != ext[:-2])
        alpha = np.full(ext.size, -np.inf)
        alpha[:2] = lp[0, n, ext[:2]] if il[n] > 0 else -np.inf
        for step in range(1, int(il[n])):
            prev = alpha
            alpha = prev.copy()
            alpha[1:] = np.logaddexp(alpha[1:], prev[:-1])
            alpha[skip] = np.logaddexp(alpha[skip], prev[np.flatnonzero(skip) - 2])
            alpha = alpha + lp[step, n, ext]
        if il[n] == 0:
            loss = 0.0 if length == 0 else np.inf
        else:
            loss = -np.logaddexp.reduce(alpha[-2:] if length else alpha[-1:])
        losses.append(0.0 if zero_infinity and loss == np.inf else loss)
    return np.array(losses) if batched else np.array(losses[0])


def _example(rng, size, dtype, steps=12, classes=6, width=4):
    """Log-probabilities of ``steps`` frames of ``classes`` for a batch of about ``size``
    elements; padded targets of up to ``width`` ids; input lengths long enough for every
    target."""
    batch = max(2, size // (steps * classes))
    z = rng.standard_normal((steps, batch, classes))
    lp = z - np.log(np.exp(z).sum(axis=2, keepdims=True))
    tl = rng.integers(max(1, width // 2), width + 1, batch)
    targets = rng.integers(1, classes, (batch, width))
    targets[np.arange(width) >= tl[:, None]] = 0  # padding, never read
    il = rng.integers(np.minimum(2 * tl + 1, steps), steps + 1)
    return (lp.astype(dtype), targets, il, tl), {}


# option sets for the conformance kit
def _concatenated(rng, arrays, dtype):
    targets, tl = arrays[1], arrays[3]
    return {"targets": targets[np.arange(targets.shape[1]) < tl[:, None]]}


def _last_blank(rng, arrays, dtype):  # ids 0 .. C - 2 and blank C - 1
    return {"targets": arrays[1] - 1, "blank": arrays[0].shape[-1] - 1}


def _infeasible(rng, arrays, dtype):
    """The first sample's target, two equal ids, in two frames (three needed): an infinite
    loss, zeroed; and a second sample without frames or target."""
    targets, il, tl = arrays[1].copy(), arrays[2].copy(), arrays[3].copy()
    targets[0, :2] = 3
    tl[0], il[0] = 2, 2
    il[1] = tl[1] = 0
    return {"targets": targets, "input_lengths": il, "target_lengths": tl, "zero_infinity": True}


def _through_log_softmax(arrays, options, grad_output):
    """The term of the gradient that is not the derivative of the value (see the docstring):
    ``exp(log_probs) * g_n`` over each sample's frames, where its loss is finite."""
    lp = np.asarray(arrays[0], np.float64)
    losses = np.asarray(_reference(*arrays, **{**options, "zero_infinity": False}))
    g = np.where(np.isfinite(losses), grad_output, 0.0)
    frames = np.arange(lp.shape[0])[:, None] < np.atleast_1d(arrays[2])  # (T, N)
    return np.exp(lp) * (frames * np.atleast_1d(g)).reshape((*lp.shape[:-1], 1))


SPECS = [
    LossSpec(
        name="ctc_loss",
        family="sequence",
        arguments=("log_probs", "targets", "input_lengths", "target_lengths"),
        differentiable=("log_probs",),
        options={"blank": 0, "reduction": "mean", "zero_infinity": False},
        prepare=_prepare,
        reference=_reference,
        example=_example,
        # speech-like: 200 frames, 30 classes (characters), targets of up to 50
        example_variants=({"steps": 200, "classes": 30, "width": 50},),
        option_sets=(_concatenated, _last_blank, _infeasible),
        weighted_mean=True,
        gradient_term=_through_log_softmax,
        doc=_DOC,
    )
]


@hookimpl
def lossforge_losses():
    return SPECS


@hookimpl
def lossforge_kernels():
    yield KernelSpec("ctc_loss", "cpu", "lossforge.plugins.sequence.cpu:ctc_loss")
    yield KernelSpec("ctc_loss", "cuda", "lossforge.plugins.sequence.cuda:ctc_loss")
