"""The kinds of kernel LoRA adapts, one record each: its input and output axis counts (what
`lj.kernel_layouts` gives and `apply`'s factored forward contracts), and how its factors are
laid out in peft's files, both ways, checked against the base kernel (what `io` reads).

Our factors are A (*in, r) and B (r, *out) beside a kernel (*in, *out), one layer's (the
stacked-layer axes are `io`'s and `tree`'s concern); torch's and peft's put the output first.

- `Linear` (Dense, DenseGeneral, Einsum): peft's Linear sees the input axes and the output
  axes each flattened row-major: A (r, in), B (out, r), DoRA's magnitude (out,).
- `ConvLayout` (Conv): the spatial axes and the input channels are the input axes, the output
  channels the one output axis; peft's A (r, in, *spatial) and B (out, r, 1, ...) are
  convolutions, the magnitude (1, out, 1, ...).
- `Grouped` (GroupedDense: a mixture's experts, kernel (E, in, out), E indexed by the call):
  peft's ParamWrapper stacks the experts' factors, A (E·r, in) expert-major, B (out, r·E)
  rank-major.

AdaLoRA's E is (r, 1) in every kind. A new kind is a record here with these four members,
returned by the module's plan in `apply` and chosen in `io._kind`.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, NamedTuple

import numpy as np

LORA_A, LORA_B = "lora_a", "lora_b"
LORA_E = "lora_e"  # variants.SINGULAR: AdaLoRA's singular values, (r,)


def to_torch(array: Any) -> Any:
    """A kernel in torch's layout: (in, out) -> (out, in), and a convolution's (*spatial, in,
    out) -> (out, in, *spatial); peft's factors A (.., in, r) and (r, out) map the same way."""
    n = array.ndim
    return array.transpose(n - 1, n - 2, *range(n - 2))


def from_torch(tensor: Any) -> Any:
    """`to_torch` inverted: (out, in, *spatial) -> (*spatial, in, out)."""
    n = tensor.ndim
    return tensor.transpose(*range(2, n), 1, 0)


class _Axes(NamedTuple):
    n_in: int = 1  # the kernel's input axes (after any group axis)
    n_out: int = 1  # its output axes


class Linear(_Axes):
    """A Dense, DenseGeneral or Einsum kernel (*in, *out); equal to the plain (n_in, n_out)."""

    __slots__ = ()
    groups: ClassVar[int] = 0  # leading kernel axes the call indexes (none)

    def to_peft(self, leaf: str, factor: Any) -> Any:
        """One layer's factor as peft stores it: A (r, in), B (out, r), E (r, 1), the
        magnitude (out,), several input or output axes flattened row-major."""
        if leaf == LORA_A:
            return factor.reshape(-1, factor.shape[-1]).T
        if leaf == LORA_B:
            return factor.reshape(factor.shape[0], -1).T
        return factor.reshape(-1, 1) if leaf == LORA_E else factor.reshape(-1)

    def from_peft(self, name: str, leaf: str, tensor: Any, rank: int) -> Any:
        """`to_peft` inverted as far as the file alone tells: A (.., in, r), B (r, out), E and
        the magnitude flat (a convolution's told by their extra axes)."""
        if leaf == LORA_A:
            return from_torch(tensor)
        if leaf == LORA_B and tensor.ndim > 2 and any(n != 1 for n in tensor.shape[2:]):
            raise ValueError(f"{name}: shape {tensor.shape}; a convolution's lora_B is (out, r, "
                             "1, ...), a 1x1 convolution.")  # fmt: skip
        return tensor.reshape(tensor.shape[:2]).T if leaf == LORA_B else tensor.reshape(-1)

    def fit(self, leaf: str, factor: Any, kernel: tuple[int, ...]) -> Any:
        """`from_peft`'s factor shaped like one layer's `kernel` (its group axis included), or
        a ValueError saying the shape expected."""
        groups, kernel = kernel[: self.groups], kernel[self.groups :]
        if factor.shape[: self.groups] != groups:
            raise ValueError(f"{factor.shape[0]} experts' factors, but the base kernel holds "
                             f"{groups[0]}.")  # fmt: skip
        ins, outs = kernel[: self.n_in], kernel[self.n_in :]
        each = factor.shape[self.groups :]
        want, form = self._expected(leaf, each, ins, outs)
        if not _fits(each, want):
            raise ValueError(f"shape {factor.shape} does not fit the base kernel {kernel} "
                             f"(expected {form}).")  # fmt: skip
        if leaf == LORA_A:
            return factor.reshape(*groups, *ins, -1)
        if leaf == LORA_B:
            return factor.reshape(*groups, -1, *outs)
        return factor if leaf == LORA_E else factor.reshape(outs)

    @staticmethod
    def _expected(leaf: str, each: tuple, ins: tuple, outs: tuple) -> tuple[tuple, str]:
        """(the shape `fit` takes of one group's factor, None where any size goes; its name)."""
        if leaf == LORA_A and len(each) > 2:
            return (*ins, None), "(*spatial, in, r), a convolution's"
        return {
            LORA_A: ((math.prod(ins), None), "(in, r)"),
            LORA_B: ((None, math.prod(outs)), "(r, out)"),
            LORA_E: ((None,), "(r,)"),
        }.get(leaf, ((math.prod(outs),), "(out,)"))


class ConvLayout(Linear):
    """A convolution's kernel (*spatial, in, out): its spatial axes and input channels are the
    input axes, its output channels the one output axis."""

    __slots__ = ()

    def to_peft(self, leaf: str, factor: Any) -> Any:
        """peft's Conv layers: A (r, in, *spatial), B (out, r, 1, ...), the magnitude (1, out,
        1, ...)."""
        ones = (1,) * (self.n_in - 1)
        if leaf == LORA_A:
            return to_torch(factor)
        if leaf == LORA_B:
            return factor.T.reshape(-1, factor.shape[0], *ones)
        return factor.reshape(-1, 1) if leaf == LORA_E else factor.reshape(1, -1, *ones)

    def fit(self, leaf: str, factor: Any, kernel: tuple[int, ...]) -> Any:
        """As `Linear.fit`; an A flattened to (in·kh·kw, r), AdaLoRA's SVDConv2d's (columns in
        torch's (in, *spatial) order), is unflattened first."""
        ins = kernel[: self.n_in]
        if leaf == LORA_A and factor.ndim == 2 and factor.shape[0] == math.prod(ins):
            factor = np.moveaxis(factor.reshape(ins[-1], *ins[:-1], -1), 0, -2)
        return super().fit(leaf, factor, kernel)


class Grouped(Linear):
    """A mixture's experts: a kernel (E, in, out) whose group axis each call indexes."""

    __slots__ = ()
    groups: ClassVar[int] = 1

    def to_peft(self, leaf: str, factor: Any) -> Any:
        """peft's ParamWrapper: ours (E, in, r) and (E, r, out) as A (E·r, in) expert-major and
        B (out, r·E) rank-major."""
        if leaf == LORA_A:
            return factor.transpose(0, 2, 1).reshape(-1, factor.shape[1])
        return factor.transpose(2, 1, 0).reshape(factor.shape[2], -1)

    def from_peft(self, name: str, leaf: str, tensor: Any, rank: int) -> Any:
        """`to_peft` inverted for the rank the file gives the module: (E, in, r), (E, r, out)."""
        if tensor.ndim != 2 or tensor.shape[leaf == LORA_B] % rank:
            raise ValueError(f"{name}: shape {tensor.shape}; an expert parameter's lora_A is "
                             f"(E·r, in), lora_B (out, E·r) with r = {rank}.")  # fmt: skip
        if leaf == LORA_A:
            return tensor.reshape(-1, rank, tensor.shape[1]).transpose(0, 2, 1)
        return tensor.reshape(tensor.shape[0], rank, -1).transpose(2, 1, 0)


Kind = Linear  # every kind is a Linear, or one of its subclasses


def kind_of(layout: tuple[int, int]) -> Kind:
    """A layout given as a plain (n_in, n_out) pair (`lj.kernel_layouts` or a user's dict) as
    its record: a Linear unless it already is a kind."""
    return layout if isinstance(layout, Linear) else Linear(*layout)


def _fits(shape: tuple[int, ...], want: tuple) -> bool:
    """Whether `shape` has `want`'s sizes (None in `want` takes any)."""
    if len(shape) != len(want):
        return False
    return all(w in (None, n) for w, n in zip(want, shape, strict=True))
