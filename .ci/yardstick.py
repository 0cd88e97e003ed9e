"""This machine's speed, to print beside a timing: ms per training step of a fixed MLP.

13 layers of width 128 (the toy's depth and width), batch 128, plain SGD, 100 steps under one
`lax.scan`; the best of five timed scans after a warm-up. `python .ci/yardstick.py`."""

import time

import jax

WIDTH, DEPTH, BATCH, STEPS = 128, 13, 128, 100


def loss(weights, x):
    for w in weights:
        x = jax.nn.relu(x @ w)
    return (x**2).mean()


@jax.jit
def scan_steps(weights, xs):
    def step(weights, x):
        grads = jax.grad(loss)(weights, x)
        return [w - 1e-3 * g for w, g in zip(weights, grads)], None

    return jax.lax.scan(step, weights, xs)[0]


def main() -> None:
    keys = jax.random.split(jax.random.key(0), DEPTH + 1)
    scale = WIDTH**-0.5
    weights = [scale * jax.random.normal(k, (WIDTH, WIDTH)) for k in keys[:-1]]
    xs = jax.random.normal(keys[-1], (STEPS, BATCH, WIDTH))
    jax.block_until_ready(scan_steps(weights, xs))  # compile and warm up
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        jax.block_until_ready(scan_steps(weights, xs))
        best = min(best, time.perf_counter() - started)
    print(f"yardstick: {1e3 * best / STEPS:.2f} ms per step (13 x 128 MLP, batch 128, lax.scan)")


if __name__ == "__main__":
    main()
