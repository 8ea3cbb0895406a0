"""GELU and its derivative inside Triton kernels: one definition for every kernel that applies it.

``APPROX_TANH`` picks transformers' "gelu_new" tanh form; otherwise the exact erf form (BERT's "gelu").
The derivatives, written out (Phi the normal CDF, phi its density):
  exact: d/dz [z Phi(z)] = Phi(z) + z phi(z)
  tanh:  with u = sqrt(2/pi) (z + 0.044715 z^3) and s = sigmoid(2u) (= (1 + tanh u) / 2, so gelu = z s),
         d/dz [z s] = s + 2 z s (1 - s) du/dz,  du/dz = sqrt(2/pi) (1 + 3 * 0.044715 z^2)
"""

import triton
import triton.language as tl

_SQRT_2_OVER_PI: tl.constexpr = tl.constexpr(0.7978845608028654)
_INV_SQRT_2: tl.constexpr = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI: tl.constexpr = tl.constexpr(0.3989422804014327)
_TANH_CUBIC: tl.constexpr = tl.constexpr(0.044715)


@triton.jit
def gelu(z, APPROX_TANH: tl.constexpr):
    if APPROX_TANH:
        inner = _SQRT_2_OVER_PI * (z + _TANH_CUBIC * z * z * z)
        return z * tl.sigmoid(2.0 * inner)
    else:
        return 0.5 * z * (1.0 + tl.math.erf(z * _INV_SQRT_2))


@triton.jit
def gelu_derivative(z, APPROX_TANH: tl.constexpr):
    if APPROX_TANH:
        inner = _SQRT_2_OVER_PI * (z + _TANH_CUBIC * z * z * z)
        s = tl.sigmoid(2.0 * inner)
        inner_derivative = _SQRT_2_OVER_PI * (1.0 + 3.0 * _TANH_CUBIC * z * z)
        return s + 2.0 * z * s * (1.0 - s) * inner_derivative
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(z * _INV_SQRT_2))
        pdf = _INV_SQRT_2PI * tl.exp(-0.5 * z * z)
        return cdf + z * pdf
