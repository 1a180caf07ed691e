"""``optim.sparse_adam``'s fused native pass on ``[out, in]`` kernels equals the lifted
``optax.adam`` (``compact(optax.adam(...))``): parameters and state, clip and schedules
included; it is the program's path where it applies, and nowhere else."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import meprop_jax
from meprop_jax import optim
from meprop_jax._src import native
from meprop_jax.linen import TRANSPOSED_KERNEL

needs_native = pytest.mark.skipif(not native.enabled(), reason="native kernels not built")


class MLP(nn.Module):
    layout: str = "out_in"

    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = meprop_jax.Dense(
                12,
                k=3,
                mode="per_example",
                sparse_update=True,
                kernel_layout=self.layout,
                name=f"hidden_{i}",
            )(x)
            x = nn.relu(x)
        return nn.Dense(4, name="output")(x)


def _train(tx, layout="out_in", steps=5):
    model = MLP(layout)
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(rng.standard_normal((5, 7)), jnp.float32)
    variables = model.init(jax.random.key(0), x0)
    state = meprop_jax.TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        taps=variables[optim.TAP_COLLECTION],
        tx=tx,
    )

    def step(state, x, y):
        def loss_fn(variables):
            logits = state.apply_fn(variables, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        _, grads = state.value_and_grad(loss_fn)
        return state.apply_gradients(grads=grads)

    compiled = jax.jit(step, donate_argnums=0)
    text = compiled.lower(state, x0, jnp.zeros(5, jnp.int32)).as_text()
    for _ in range(steps):
        x = jnp.asarray(rng.standard_normal((5, 7)) * 3, jnp.float32)
        y = jnp.asarray(rng.integers(0, 4, 5), jnp.int32)
        state = compiled(state, x, y)
    return state, text


def _close(a, b):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=2e-5, atol=2e-6), a, b)


@needs_native
@pytest.mark.parametrize(
    ("lr", "clip"),
    [(0.05, None), (optax.linear_schedule(0.1, 0.01, 4), 0.3)],
    ids=["constant", "schedule+clip"],
)
def test_fused_sparse_adam_equals_lifted_optax_adam(lr, clip):
    fused, text = _train(optim.sparse_adam(lr, clip=clip))
    assert "meprop_adam_rows" in text
    adam = optax.adam(lr)
    lifted, lifted_text = _train(
        optim.compact(adam if clip is None else optax.chain(optax.clip(clip), adam))
    )
    assert "meprop_adam_rows" not in lifted_text
    moved = jax.tree.map(
        lambda a, b: bool(jnp.any(a != b)),
        fused.params,
        _train(optim.sparse_adam(lr, clip=clip), steps=0)[0].params,
    )
    assert moved["hidden_0"][TRANSPOSED_KERNEL]  # the steps did train the kernel
    _close(fused.params, lifted.params)
    _close(fused.opt_state, lifted.opt_state)


@needs_native
def test_fused_pass_only_where_it_applies():
    # The stock [in, out] layout (strided columns) and a disabled native path use optax.
    _, text = _train(optim.sparse_adam(0.05), layout="in_out", steps=0)
    assert "meprop_adam_rows" not in text
    with native.disabled():
        _, text = _train(optim.sparse_adam(0.05), steps=0)
    assert "meprop_adam_rows" not in text


def test_sparse_adam_trains_alike_in_both_layouts():
    transposed, _ = _train(optim.sparse_adam(0.05), steps=4)
    stock, _ = _train(optim.sparse_adam(0.05), layout="in_out", steps=4)
    _close(meprop_jax.to_kernel_layout(transposed.params, "in_out"), stock.params)
