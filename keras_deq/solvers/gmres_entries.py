"""What `GMRES` measures and keeps per sample: one residual per sample (`Samples`), or
one per entry of a sample whose entries are coupled (`Entries`, `solver_batch_dims` > 1).

A Krylov process must span the whole linear system it solves. Where the entries of a
sample (the positions of a sequence) are coupled, as attention couples them in the
adjoint of a DEQ-Transformer, a process per entry would read, in its differences of
`h`, the probes of the other entries' processes (their `A v` leaks into its own), and
converges slowly (a causal coupling: a cascade from the last position back) or not at
all. `Entries` keeps one process per sample and tests the tolerance per entry.
"""

from keras import ops

from keras_deq.solvers import result as res


def norm(t):
    """The Euclidean norm of each row of `t`, `(batch,)`."""
    return ops.sqrt(res.row_sums(t * t))


class Samples:
    """Each sample (row of the `(batch, n)` state) is one system with one tolerance test."""

    def __init__(self, tol, stop_mode):
        self.tol, self.stop_mode = tol, stop_mode

    def initial_best(self, z0):
        return res.initial_best(z0)

    def measure(self, best, p, fp, krylov):
        """`(best, finite)`: `best` with the residual of `p` (`fp = h(p)`) where `p` is a
        sample's iterate (not `krylov`), and each sample's image finite, `(batch,)`."""
        tol, stop_mode = self.tol, self.stop_mode
        residual = res.residuals(fp, p)
        finite = ops.isfinite(residual.abs_residual)
        measured = res.update_best(
            best, p, residual.abs_residual, residual.rel_residual, stop_mode, tol
        )
        kept = res.where_rows(~krylov, measured[:3], best[:3])
        return res.Best(*kept, best.failed | ~finite), finite

    def settled(self, best):
        """`(batch,)`: the sample met `tol` or failed (it measures no more)."""
        return res.converged(best, self.tol, self.stop_mode) | best.failed

    def estimate_rel(self, estimate, xk):
        """The relative residual of the Krylov iterate `xk` from the norm `estimate` of
        its residual: `||h(x)|| >= ||x|| - ||r||`."""
        return res.relative(estimate, ops.maximum(norm(xk) - estimate, 0.0))

    def guard(self, best, p_next):
        return res.guard(best, p_next)

    def keep_going(self, best):
        return res.keep_going(best, self.tol, self.stop_mode)

    def to_result(self, best, steps, unpack):
        return res.to_result(best, steps, self.tol, self.stop_mode, unpack)


class Entries(Samples):
    """Each sample is one system whose entries, `entry_size` wide, each meet `tol`.

    The best iterate is a sample's: the first whose entries all met `tol`, else the one
    with the lowest residual norm over the sample (what GMRES minimizes), so that the
    returned state of a sample is one measured iterate and its entries' residuals are
    those of that state. Its `Best` holds `z` per sample `(batch, n)` and residuals and
    `failed` per entry `(batch * entries,)`, in the order of the rows of
    `reshape(z, (-1, entry_size))`. A sample an entry of which met a non-finite value is
    frozen at its best iterate.
    """

    def __init__(self, tol, stop_mode, entry_size, entries):
        super().__init__(tol, stop_mode)
        self.entry_size, self.entries = entry_size, entries

    def rows(self, t):
        """`(batch, n)` -> `(batch * entries, entry_size)`."""
        return ops.reshape(t, (-1, self.entry_size))

    def by_sample(self, t):
        """`(batch * entries,)` -> `(batch, entries)`."""
        return ops.reshape(t, (-1, self.entries))

    def initial_best(self, z0):
        best = res.initial_best(self.rows(z0))
        return best._replace(z=z0)

    def _each_entry(self, mask, like):
        """`(batch,)` -> `(batch * entries,)`, the shape of `like`: each sample's value
        for each of its entries."""
        return ops.reshape(ops.broadcast_to(mask[:, None], ops.shape(self.by_sample(like))), (-1,))

    def _sample_failed(self, failed):
        return ops.any(self.by_sample(failed), axis=1)

    def _sample_met(self, abs_res, rel_res):
        crit = res.criterion(abs_res, rel_res, self.stop_mode)
        return ops.all(self.by_sample(crit <= self.tol), axis=1)

    def _sample_norm(self, abs_res):
        return ops.sqrt(ops.sum(ops.square(self.by_sample(abs_res)), axis=1))

    def measure(self, best, p, fp, krylov):
        residual = res.residuals(self.rows(fp), self.rows(p))
        abs_res, rel_res = residual.abs_residual, residual.rel_residual
        finite = ops.isfinite(abs_res)
        failed = best.failed | ~finite
        sample_norm = self._sample_norm(abs_res)
        met = self._sample_met(best.abs_residual, best.rel_residual)
        better = self._sample_met(abs_res, rel_res) | (
            sample_norm < self._sample_norm(best.abs_residual)
        )
        better = better & ~met & ~self._sample_failed(failed) & ~krylov
        entries = self._each_entry(better, abs_res)
        best = res.Best(
            res.where_rows(better, p, best.z),
            ops.where(entries, abs_res, best.abs_residual),
            ops.where(entries, rel_res, best.rel_residual),
            failed,
        )
        return best, ~self._sample_failed(~finite)

    def settled(self, best):
        met = self._sample_met(best.abs_residual, best.rel_residual)
        return met | self._sample_failed(best.failed)

    def estimate_rel(self, estimate, xk):
        # Every entry's residual is at most the sample's, `estimate`; its image at least
        # its norm less that: a bound for the entry of the smallest norm, so that the
        # Krylov iterate is measured once every entry should meet `tol`.
        smallest = ops.min(self.by_sample(norm(self.rows(xk))), axis=1)
        return res.relative(estimate, ops.maximum(smallest - estimate, 0.0))

    def guard(self, best, p_next):
        bad = ~ops.isfinite(res.row_sums(p_next))
        failed = self._sample_failed(best.failed) | bad
        p_next = res.replace_rows(failed, best.z, p_next)
        return p_next, best._replace(failed=best.failed | self._each_entry(bad, best.failed))

    def keep_going(self, best):
        return ops.any(~self.settled(best))
