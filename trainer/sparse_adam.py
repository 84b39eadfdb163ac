"""Row-sparse word-embedding updates: `RowSparseAdamW` and what it needs around it.

With `train.embedding_updates=sparse` (ZeRO-0) the word-embedding table gives sparse gradients
(the rows a step touched) and this AdamW updates only those rows, each catching up on the
momentum and weight-decay steps it missed, so the weights stay those dense AdamW would have.
`build_engine` (engine.py) installs it; `catch_up_rows` settles every row before an evaluation
or an export.
"""

from __future__ import annotations

import math
from typing import Any

import torch


class RowSparseAdamW(torch.optim.AdamW):
    """AdamW (fused, as torch's) that updates a parameter with a sparse gradient row by row, on demand.

    A batch touches a few thousand of the word-embedding table's rows (XLM-R: 250,002); dense AdamW
    still reads and writes all of them, and the dense gradient behind it is a table-sized buffer
    allocated, zeroed and scattered into every step. With `nn.Embedding(sparse=True)` the gradient
    holds the touched rows only, and this optimizer works on those rows.

    Dense AdamW keeps moving a row after its gradient is gone: its momentum decays by beta1 a step
    and still updates the weight, and weight decay shrinks it. Plain lazy Adam (TensorFlow's
    LazyAdam, torch's SparseAdam) drops those steps; measured here, that cost 0.08 dev F1 after one
    epoch on 3000 CoNLL sentences (a rare word's embedding moves about a tenth as far). This
    optimizer owes them instead: each row remembers the step it was last brought up to date
    (`row_step`), and before its next update, or before an evaluation (`catch_up`), the steps it
    missed are applied at once. Over gradient-free steps j the moments decay by beta1 and beta2 a
    step (exactly), the weight by (1 - lr_j * wd) (exactly, from a running sum of logs), and the
    updates lr_j * mhat_j / (sqrt(vhat_j) + eps) sum to about m / (sqrt(v) + eps') times sum_i (beta1 / sqrt(beta2))^i
    * lr_j * sqrt(1 - beta2^j) / (1 - beta1^j), over the steps' recorded learning rates and bias
    corrections and the weight decay of the later missed steps, cut where the ratio's power falls
    below 1e-12; eps enters each row's denominator as in its first missed step (the series'
    largest term): without it, rows with tiny gradients moved as far as Adam's normalised step,
    far more than dense AdamW moves them. The state is
    AdamW's (`step`, `exp_avg`, `exp_avg_sq`) plus `row_step` and the per-step records, so a
    checkpoint resumes exactly.
    """

    CHUNK_ROWS = 8192  # catch_up's rows per pass (its work is rows x the series' length)
    OWN_DTYPE = ("row_step", "step_coef", "log_keep")  # int64, float64, float64: not the parameter's

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, but `row_step` and the per-step records keep their dtypes (torch casts every
        state tensor but `step` to the parameter's dtype, which would round them: no exact resume)."""
        own = {
            pid: {k: v.clone() for k, v in st.items() if k in self.OWN_DTYPE}
            for pid, st in state_dict["state"].items()
        }
        super().load_state_dict(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(ids, params, strict=True):
            for k, v in own.get(pid, {}).items():
                self.state[p][k] = v.to(p.device)

    def step(self, closure=None):  # type: ignore[override]
        sparse: list[tuple[dict[str, Any], torch.nn.Parameter, torch.Tensor]] = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    sparse.append((group, p, p.grad))
                    p.grad = None  # the fused dense step skips it
        loss = super().step(closure)
        with torch.no_grad():
            for group, p, grad in sparse:
                self._rows_step(group, p, grad.coalesce())
                p.grad = grad
        return loss

    def _state(self, p: torch.nn.Parameter) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if "row_step" not in state:  # also a state from dense AdamW: every row is up to date
            now = int(state["step"])
            state["row_step"] = torch.full((p.shape[0],), now, dtype=torch.int64, device=p.device)
            # per step j (index j; 0 unused): lr_j * bias_j, and the running sum of log(1 - lr_j * wd)
            state["step_coef"] = torch.zeros(now + 1, dtype=torch.float64, device=p.device)
            state["log_keep"] = torch.zeros(now + 1, dtype=torch.float64, device=p.device)
        return state

    @staticmethod
    def _record(state: dict[str, Any], group: dict[str, Any], t: int) -> None:
        beta1, beta2 = group["betas"]
        lr = float(group["lr"])
        coef = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
        keep = float(state["log_keep"][t - 1]) + math.log1p(-lr * group["weight_decay"])
        if t >= state["step_coef"].numel():  # the records grow by doubling: index t, not the end, is step t
            grow = max(t + 1, 2 * state["step_coef"].numel())
            for key in ("step_coef", "log_keep"):
                old = state[key]
                state[key] = torch.cat([old, old.new_zeros(grow - old.numel())])
        state["step_coef"][t] = coef
        state["log_keep"][t] = keep

    def _settle(
        self,
        group: dict[str, Any],
        state: dict[str, Any],
        p: torch.Tensor,
        rows: torch.Tensor,
        now: int,
    ) -> None:
        """Apply to `rows` the gradient-free steps after their `row_step`, up to step `now`."""
        last = state["row_step"].index_select(0, rows)
        owing = last < now
        if not bool(owing.any()):
            return
        rows, last = rows[owing], last[owing]
        beta1, beta2 = group["betas"]
        ratio = beta1 / math.sqrt(beta2)
        span = 4096 if ratio >= 1 else max(1, math.ceil(math.log(1e-12) / math.log(ratio)))
        span = min(span, now)
        i = torch.arange(1, span + 1, device=p.device)
        powers = torch.pow(torch.tensor(ratio, dtype=torch.float64, device=p.device), i)
        # The series depends on a row's last step alone: computed once per distinct one (a catch-up
        # of the whole table has at most `now` of them, against 250,002 rows).
        firsts, which = torch.unique(last, return_inverse=True)
        steps = firsts.unsqueeze(1) + i  # the missed steps (masked past `now`)
        at = steps.clamp(max=now)
        # each missed step's update, decayed by the weight decay of the missed steps after it
        later_decay = torch.exp(state["log_keep"][now] - state["log_keep"][at])
        series = (state["step_coef"][at] * later_decay * powers * (steps <= now)).sum(1)[which]
        keep = torch.exp(state["log_keep"][now] - state["log_keep"][last])
        k = (now - last).to(torch.float64).unsqueeze(1)
        m = state["exp_avg"].index_select(0, rows)
        v = state["exp_avg_sq"].index_select(0, rows)
        w = p.index_select(0, rows)
        # eps as in the first missed step (the series' largest term): eps * sqrt(1 - beta2^j) beside sqrt(v)
        eps = group["eps"] * torch.sqrt(1 - torch.pow(beta2, (last + 1).to(torch.float64)))
        denom = v.sqrt().add_(eps.to(p.dtype).unsqueeze(1)).clamp_(min=1e-30)
        w.mul_(keep.to(p.dtype).unsqueeze(1)).sub_(series.to(p.dtype).unsqueeze(1) * m / denom)
        m.mul_(torch.pow(beta1, k).to(p.dtype))
        v.mul_(torch.pow(beta2, k).to(p.dtype))
        state["exp_avg"].index_copy_(0, rows, m)
        state["exp_avg_sq"].index_copy_(0, rows, v)
        p.index_copy_(0, rows, w)
        state["row_step"].index_fill_(0, rows, now)

    def _rows_step(self, group: dict[str, Any], p: torch.nn.Parameter, grad: torch.Tensor) -> None:
        state = self._state(p)
        rows, g = grad.indices()[0], grad.values().to(p.dtype)
        self._settle(group, state, p, rows, int(state["step"]))  # the steps these rows missed
        state["step"] += 1
        t = int(state["step"])
        self._record(state, group, t)
        if rows.numel() == 0:
            return
        beta1, beta2 = group["betas"]
        lr, eps, decay = float(group["lr"]), group["eps"], group["weight_decay"]
        exp_avg = state["exp_avg"].index_select(0, rows).mul_(beta1).add_(g, alpha=1 - beta1)
        exp_avg_sq = state["exp_avg_sq"].index_select(0, rows).mul_(beta2).addcmul_(g, g, value=1 - beta2)
        state["exp_avg"].index_copy_(0, rows, exp_avg)
        state["exp_avg_sq"].index_copy_(0, rows, exp_avg_sq)
        w = p.index_select(0, rows)
        if decay:
            w.mul_(1 - lr * decay)
        denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
        w.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**t))
        p.index_copy_(0, rows, w)
        state["row_step"].index_fill_(0, rows, t)

    @torch.no_grad()
    def settle_rows(self, p: torch.Tensor, rows: torch.Tensor) -> None:
        """Bring `rows` of `p` up to the current step (before a forward reads them)."""
        state = self.state.get(p)
        if not state or "row_step" not in state:
            return
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        self._settle(group, state, p, rows, int(state["step"]))

    @torch.no_grad()
    def catch_up(self) -> None:
        """Bring every row of every sparse-updated parameter up to the current step (before evaluating)."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and "row_step" in state:
                    now = int(state["step"])
                    for start in range(0, p.shape[0], self.CHUNK_ROWS):
                        rows = torch.arange(start, min(start + self.CHUNK_ROWS, p.shape[0]), device=p.device)
                        self._settle(group, state, p, rows, now)


def settle_before_lookup(table: torch.nn.Embedding, optimizer: RowSparseAdamW) -> Any:
    """Before each lookup in `table`, bring the rows it reads up to date: the forward then sees the
    weights dense AdamW would have. Returns the hook's handle.

    One worker only: with several, each rank would settle the rows of its own batch, and rows settled
    in different pieces round differently, so the replicas would drift apart by rounding. There,
    rows are settled when the all-reduced gradient (the same on every rank) updates them, and a
    forward may read a row that still owes the momentum steps since its last update.
    """

    def pre(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        optimizer.settle_rows(table.weight, torch.unique(args[0]))

    return table.register_forward_pre_hook(pre)


def catch_up_rows(engine) -> None:
    """Before an evaluation or export: apply the steps sparse-updated rows still owe (RowSparseAdamW)."""
    optimizer = getattr(engine, "optimizer", None)
    if isinstance(optimizer, RowSparseAdamW):
        optimizer.catch_up()


def sparse_embedding_table(model: torch.nn.Module) -> torch.nn.Embedding | None:
    """The model's word-embedding table, if it is an `nn.Embedding` that can give sparse gradients."""
    get = getattr(model, "get_input_embeddings", None)
    table = get() if callable(get) else None
    if isinstance(table, torch.nn.Embedding) and table.max_norm is None:
        return table
    return None
