"""Depth operators checked against dense matrices built here, entry by entry, in float64."""

from __future__ import annotations

import pytest
import torch

from gradsmooth.smoothing.operators import add_mixed_, band_terms, is_identity, mix, mixing_matrix

WINDOWS = (1, 3, 5, 7)
DEPTHS = tuple(range(2, 13))
KERNELS = ("uniform", "exponential")
ALPHAS = (0.0, 0.2, 0.7, 1.0)
DECAY = 0.4


pytestmark = pytest.mark.usefixtures("single_thread")


def side_weights(window: int, alpha: float, kernel: str, decay: float) -> dict[int, float]:
    """Return {distance: weight} of the neighbours on one side of a block."""
    k = (window - 1) // 2
    if k == 0:
        return {}
    if kernel == "uniform":
        return {d: alpha / (2 * k) for d in range(1, k + 1)}

    # The exponential kernel weights distance d in proportion to decay ** (d - 1), and one side sums to alpha / 2.
    norm = sum(decay ** (d - 1) for d in range(1, k + 1))
    return {d: alpha / 2 * decay ** (d - 1) / norm for d in range(1, k + 1)}


def expected_window(depth: int, window: int, alpha: float, kernel: str, decay: float = DECAY) -> torch.Tensor:
    """Build the window matrix entry by entry: M[i, j] from |i - j|, the diagonal from missing neighbours."""
    weights = side_weights(window, alpha, kernel, decay)
    if not weights:
        # Window 1 is the identity for every alpha.
        return torch.eye(depth, dtype=torch.float64)

    matrix = torch.zeros(depth, depth, dtype=torch.float64)

    for i in range(depth):
        for j in range(depth):
            if i != j and abs(i - j) in weights:
                matrix[i, j] = weights[abs(i - j)]

        missing = 0.0
        for d, w in weights.items():
            if i - d < 0:
                missing += w
            if i + d > depth - 1:
                missing += w
        matrix[i, i] = 1.0 - alpha + missing

    return matrix


def ema_recurrence(tensors: list[torch.Tensor], alpha: float, direction: str) -> list[torch.Tensor]:
    """Apply out_i = (1 - alpha) x_i + alpha out_{i-1}, out_0 = x_0 (mirrored for backward)."""
    order = list(tensors) if direction == "forward" else list(reversed(tensors))
    out = [order[0].clone()]
    for x in order[1:]:
        out.append((1 - alpha) * x + alpha * out[-1])
    return out if direction == "forward" else list(reversed(out))


def random_sequence(depth: int, shape: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, dtype=torch.float64, generator=generator) for _ in range(depth)]


def dense_mix(tensors: list[torch.Tensor], matrix: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,j...->i...", matrix, torch.stack(tensors))


# --- window matrix --------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("depth", DEPTHS)
def test_window_matches_dense(depth, window, kernel):
    for alpha in ALPHAS:
        got = mixing_matrix(depth, "window", window=window, alpha=alpha, kernel=kernel, decay=DECAY)
        want = expected_window(depth, window, alpha, kernel)

        assert got.dtype == torch.float64
        assert got.shape == (depth, depth)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-15, msg=f"alpha={alpha}")
        torch.testing.assert_close(got.sum(dim=1), torch.ones(depth, dtype=torch.float64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("window", (3, 5, 7))
def test_window_interior_uniform(window):
    depth, alpha, k = 15, 0.3, (window - 1) // 2
    matrix = mixing_matrix(depth, "window", window=window, alpha=alpha, kernel="uniform")
    i = depth // 2

    assert matrix[i, i].item() == pytest.approx(1 - alpha, abs=1e-15)
    for d in range(1, k + 1):
        assert matrix[i, i - d].item() == pytest.approx(alpha / (2 * k), abs=1e-15)
        assert matrix[i, i + d].item() == pytest.approx(alpha / (2 * k), abs=1e-15)
    assert matrix[i, i + k + 1].item() == 0.0
    assert matrix[i, i - k - 1].item() == 0.0


@pytest.mark.parametrize("decay", (0.25, 0.5, 1.0))
def test_window_interior_exponential(decay):
    depth, alpha, window = 15, 0.3, 7
    matrix = mixing_matrix(depth, "window", window=window, alpha=alpha, kernel="exponential", decay=decay)
    i = depth // 2
    left = [matrix[i, i - d].item() for d in (1, 2, 3)]
    right = [matrix[i, i + d].item() for d in (1, 2, 3)]

    assert matrix[i, i].item() == pytest.approx(1 - alpha, abs=1e-15)
    assert sum(left) == pytest.approx(alpha / 2, abs=1e-15)
    assert sum(right) == pytest.approx(alpha / 2, abs=1e-15)
    assert left == pytest.approx(right, abs=1e-15)
    assert left[1] / left[0] == pytest.approx(decay, rel=1e-12)
    assert left[2] / left[1] == pytest.approx(decay, rel=1e-12)


def test_window3_edges():
    alpha = 0.2
    matrix = mixing_matrix(5, "window", window=3, alpha=alpha)

    assert matrix[0, 0].item() == pytest.approx(1 - alpha / 2, abs=1e-15)
    assert matrix[0, 1].item() == pytest.approx(alpha / 2, abs=1e-15)
    assert matrix[4, 4].item() == pytest.approx(1 - alpha / 2, abs=1e-15)
    assert matrix[4, 3].item() == pytest.approx(alpha / 2, abs=1e-15)
    assert matrix[0, 2:].abs().sum().item() == 0.0


def test_window5_edges_uniform():
    # Block 0 misses both left neighbours, alpha / 4 each, and block 1 misses one.
    alpha = 0.4
    matrix = mixing_matrix(6, "window", window=5, alpha=alpha)

    assert matrix[0, 0].item() == pytest.approx(1 - alpha / 2, abs=1e-15)
    assert matrix[0, 1].item() == pytest.approx(alpha / 4, abs=1e-15)
    assert matrix[0, 2].item() == pytest.approx(alpha / 4, abs=1e-15)
    assert matrix[1, 1].item() == pytest.approx(1 - alpha + alpha / 4, abs=1e-15)
    assert matrix[1, 0].item() == pytest.approx(alpha / 4, abs=1e-15)


def test_window_depth1():
    matrix = mixing_matrix(1, "window", window=3, alpha=0.5)
    assert torch.equal(matrix, torch.ones(1, 1, dtype=torch.float64))


def test_window_dtype():
    matrix = mixing_matrix(4, "window", window=3, alpha=0.2, dtype=torch.float32)
    assert matrix.dtype == torch.float32


# --- laplacian and ema ----------------------------------------------------------------------


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("depth", (2, 3, 6, 11))
def test_laplacian_matches_dense(depth, window, kernel):
    alpha = 0.3
    got = mixing_matrix(depth, "laplacian", window=window, alpha=alpha, kernel=kernel, decay=DECAY)
    want = 2 * torch.eye(depth, dtype=torch.float64) - expected_window(depth, window, alpha, kernel)

    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(depth, dtype=torch.float64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("direction", ("forward", "backward"))
@pytest.mark.parametrize("alpha", (0.0, 0.3, 0.9, 1.0))
@pytest.mark.parametrize("depth", (2, 5, 12))
def test_ema_recurrence(depth, alpha, direction):
    tensors = random_sequence(depth, (3, 4), seed=depth)
    matrix = mixing_matrix(depth, "ema", alpha=alpha, direction=direction)

    got = mix(tensors, matrix)
    want = ema_recurrence(tensors, alpha, direction)

    for i in range(depth):
        torch.testing.assert_close(got[i], want[i], rtol=1e-12, atol=1e-12, msg=f"block {i}")
    torch.testing.assert_close(matrix.sum(dim=1), torch.ones(depth, dtype=torch.float64), rtol=0, atol=1e-12)


def test_ema_first_block():
    forward = mixing_matrix(4, "ema", alpha=0.5, direction="forward")
    backward = mixing_matrix(4, "ema", alpha=0.5, direction="backward")

    assert forward[0].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert backward[3].tolist() == [0.0, 0.0, 0.0, 1.0]
    assert forward[1].tolist() == [0.5, 0.5, 0.0, 0.0]


# --- applying a matrix ----------------------------------------------------------------------

SHAPES = ((), (5,), (3, 4), (2, 3, 4))


def matrix_cases(depth: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(depth)
    return {
        "window": mixing_matrix(depth, "window", window=5, alpha=0.3, kernel="exponential"),
        "laplacian": mixing_matrix(depth, "laplacian", window=3, alpha=0.3),
        "ema": mixing_matrix(depth, "ema", alpha=0.6, direction="backward"),
        "dense": torch.randn(depth, depth, dtype=torch.float64, generator=generator),
    }


@pytest.mark.parametrize("name", ("window", "laplacian", "ema", "dense"))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("depth", (2, 7))
def test_mix_matches_einsum(depth, shape, name):
    matrix = matrix_cases(depth)[name]
    tensors = random_sequence(depth, shape, seed=11)

    got = mix(tensors, matrix)
    want = dense_mix(tensors, matrix)

    assert len(got) == depth
    for i in range(depth):
        assert got[i].shape == shape
        torch.testing.assert_close(got[i], want[i], rtol=1e-12, atol=1e-12, msg=f"block {i}")


def test_mix_keeps_inputs():
    tensors = random_sequence(4, (3,), seed=2)
    before = [t.clone() for t in tensors]

    mix(tensors, mixing_matrix(4, "window", window=3, alpha=0.5))

    for t, b in zip(tensors, before):
        assert torch.equal(t, b)


@pytest.mark.parametrize("name", ("window", "laplacian", "ema", "dense"))
def test_add_mixed_matches_einsum(name):
    depth = 6
    matrix = matrix_cases(depth)[name]
    sources = [random_sequence(depth, shape, seed=20 + s) for s, shape in enumerate(SHAPES)]
    targets = [random_sequence(depth, shape, seed=40 + s) for s, shape in enumerate(SHAPES)]
    start = [[t.clone() for t in slot] for slot in targets]

    add_mixed_(targets, sources, band_terms(matrix))

    for s in range(len(SHAPES)):
        want = torch.stack(start[s]) + dense_mix(sources[s], matrix)
        torch.testing.assert_close(torch.stack(targets[s]), want, rtol=1e-12, atol=1e-12, msg=f"slot {s}")


def test_band_terms_rebuild():
    matrix = matrix_cases(7)["window"]
    rebuilt = torch.zeros_like(matrix)

    for offset, coefficient, rows in band_terms(matrix):
        for i in rows:
            rebuilt[i, i + offset] += coefficient

    assert torch.equal(rebuilt, matrix)


def test_mix_wrong_length():
    with pytest.raises(ValueError, match="expected 4 tensors"):
        mix(random_sequence(3, (2,), seed=0), mixing_matrix(4))


# --- identity and bad input -----------------------------------------------------------------


@pytest.mark.parametrize("operator", ("window", "laplacian"))
@pytest.mark.parametrize("window", WINDOWS)
def test_identity_window1_or_alpha0(operator, window):
    assert is_identity(operator, 1, 0.3)
    assert is_identity(operator, window, 0.0)
    assert is_identity("ema", window, 0.0)
    if window > 1:
        assert not is_identity(operator, window, 0.3)


@pytest.mark.parametrize("alpha", (0.0, 0.2, 1.0))
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("operator", ("window", "laplacian", "ema"))
def test_identity_matches_matrix(operator, window, alpha):
    matrix = mixing_matrix(6, operator, window=window, alpha=alpha)
    is_eye = torch.equal(matrix, torch.eye(6, dtype=torch.float64))

    assert is_identity(operator, window, alpha) == is_eye


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"depth": 0}, "depth"),
        ({"depth": 4, "operator": "bogus"}, "operator"),
        ({"depth": 4, "kernel": "bogus"}, "kernel"),
        ({"depth": 4, "operator": "ema", "direction": "bogus"}, "direction"),
    ],
)
def test_mixing_matrix_bad_input(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        mixing_matrix(**kwargs)
