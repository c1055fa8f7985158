"""fused_sgd_ and FusedSGD: torch.optim.SGD semantics to fp32 round-off, Δθ, found_inf in and
out, lr tensors, layouts, bad input, state_dict round trips, opcheck and torch.compile."""

import copy

import pytest
import torch
from op_testing import OpTester

from mpl_fast import ops
from mpl_fast.optim import FusedSGD

CHUNK = 1 << 15
SHAPES = [(), (0,), (1,), (7, 3), (CHUNK + 3,), (2 * (1 << 16) + 5,), (4, 3, 3, 3)]
HYPER = [
    dict(momentum=0.0, weight_decay=0.0, nesterov=False, dampening=0.0, maximize=False),
    dict(momentum=0.9, weight_decay=5e-4, nesterov=True, dampening=0.0, maximize=False),
    dict(momentum=0.9, weight_decay=1e-2, nesterov=False, dampening=0.1, maximize=False),
    dict(momentum=0.5, weight_decay=0.0, nesterov=False, dampening=0.0, maximize=True),
    dict(momentum=0.0, weight_decay=3e-3, nesterov=False, dampening=0.0, maximize=True),
]


def _params(shapes=SHAPES, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype) for s in shapes]


def _grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g).to(p.dtype) for p in params]


def _float64_sgd(params, grads_per_step, lr, momentum, weight_decay, nesterov, dampening, maximize):
    """torch.optim.SGD in float64: the oracle."""
    ps = [p.double().clone().requires_grad_() for p in params]
    opt = torch.optim.SGD(ps, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                          dampening=dampening, maximize=maximize, foreach=False)
    for grads in grads_per_step:
        for p, g in zip(ps, grads):
            p.grad = g.double()
        opt.step()
    return [p.detach() for p in ps]


@pytest.mark.parametrize("hyper", HYPER, ids=lambda h: "-".join(f"{k}{v}" for k, v in h.items()))
@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
def test_op_matches_float64_sgd_and_torch_sgd(hyper, lr_kind):
    params = _params()
    steps = [_grads(params, seed) for seed in (1, 2, 3)]
    expected = _float64_sgd(params, steps, 0.1, **hyper)
    ours = [p.clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params] if hyper["momentum"] else None
    lr = torch.tensor(0.1) if lr_kind == "tensor" else 0.1
    torch_params = [p.clone().requires_grad_() for p in params]
    torch_opt = torch.optim.SGD(torch_params, lr=0.1, foreach=True, **hyper)
    for k, grads in enumerate(steps):
        ops.fused_sgd_(ours, grads, bufs, lr=lr, first_step=k == 0, **hyper)
        for p, g in zip(torch_params, grads):
            p.grad = g.clone()
        torch_opt.step()
    for mine, exp, theirs in zip(ours, expected, torch_params):
        torch.testing.assert_close(mine.double(), exp, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(mine, theirs.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2), (torch.float64, 1e-12)])
def test_low_and_high_precision_params(dtype, tol):
    params = _params(dtype=dtype)
    grads = _grads(params, 4)
    hyper = HYPER[1]
    expected = _float64_sgd(params, [grads], 0.05, **hyper)
    bufs = [torch.zeros_like(p) for p in params]
    ops.fused_sgd_(params, grads, bufs, lr=0.05, first_step=True, **hyper)
    for p, exp in zip(params, expected):
        assert p.dtype == dtype
        torch.testing.assert_close(p.double(), exp, rtol=tol, atol=tol)
    # The kernel agrees with the reference (the fallback) exactly up to one rounding of the output.
    params2, bufs2 = _params(dtype=dtype), [torch.zeros_like(p) for p in params]
    ops.fused_sgd_reference_(params2, grads, bufs2, lr=0.05, first_step=True, **hyper)
    for a, b in zip(params, params2):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_update_out_is_the_applied_delta_and_reference_agrees():
    params = _params()
    grads = _grads(params, 5)
    old = [p.clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    updates = [torch.full_like(p, 123.0) for p in params]
    ops.fused_sgd_(params, grads, bufs, lr=0.3, momentum=0.9, weight_decay=1e-3, nesterov=True,
                   first_step=True, update_out=updates)
    for p, o, u in zip(params, old, updates):
        assert torch.equal(u, p - o)  # exactly θ_new − θ_old as stored
    ref_params, ref_bufs = [o.clone() for o in old], [torch.zeros_like(p) for p in params]
    ref_updates = [torch.empty_like(p) for p in params]
    ops.fused_sgd_reference_(ref_params, grads, ref_bufs, lr=0.3, momentum=0.9, weight_decay=1e-3,
                             nesterov=True, first_step=True, update_out=ref_updates)
    # Δθ inherits one rounding of θ_new (an ulp of θ, FMA or not): compare at θ's scale.
    for a, b in zip(updates + bufs, ref_updates + ref_bufs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=2e-6)


def test_zero_buffers_equal_first_step():
    params = _params()
    grads = _grads(params, 6)
    a, b = [p.clone() for p in params], [p.clone() for p in params]
    bufs_a, bufs_b = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    ops.fused_sgd_(a, grads, bufs_a, lr=0.1, momentum=0.9, nesterov=True, first_step=True)
    ops.fused_sgd_(b, grads, bufs_b, lr=0.1, momentum=0.9, nesterov=True, first_step=False)
    for x, y in zip(a + bufs_a, b + bufs_b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_found_inf_skips_the_whole_step(impl):
    fn = ops.fused_sgd_ if impl == "kernel" else ops.fused_sgd_reference_
    params = _params()
    grads = _grads(params, 7)
    old = [p.clone() for p in params]
    bufs = [torch.ones_like(p) for p in params]
    updates = [torch.ones_like(p) for p in params]
    fn(params, grads, bufs, lr=0.1, momentum=0.9, update_out=updates, found_inf=torch.ones(1))
    for p, o, b, u in zip(params, old, bufs, updates):
        assert torch.equal(p, o) and torch.equal(b, torch.ones_like(b)) and not u.any()
    fn(params, grads, bufs, lr=0.1, momentum=0.9, update_out=updates, found_inf=torch.zeros(1))
    assert not all(torch.equal(p, o) for p, o in zip(params, old))


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_found_inf_out_reports_non_finite_grads(impl, bad):
    fn = ops.fused_sgd_ if impl == "kernel" else ops.fused_sgd_reference_
    params = _params()
    grads = _grads(params, 8)
    flag = torch.zeros(1)
    fn(params, grads, None, lr=0.1, found_inf_out=flag)
    assert float(flag) == 0.0
    grads[4][CHUNK + 1] = bad
    fn(params, grads, None, lr=0.1, found_inf_out=flag)
    assert float(flag) == 1.0
    fn(params, _grads(params, 9), None, lr=0.1, found_inf_out=flag)
    assert float(flag) == 1.0  # never cleared


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_found_inf_out_reports_non_finite_params_and_buffers(impl):
    fn = ops.fused_sgd_ if impl == "kernel" else ops.fused_sgd_reference_
    for poison in ("param", "buffer"):
        params = _params()
        grads = _grads(params, 10)
        bufs = [torch.zeros_like(p) for p in params]
        (params if poison == "param" else bufs)[3][2, 1] = float("inf")
        flag = torch.zeros(1)
        fn(params, grads, bufs, lr=0.1, momentum=0.9, found_inf_out=flag)
        assert float(flag) == 1.0, poison


def test_channels_last_and_non_contiguous_grads():
    p = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)
    g = torch.randn(4, 3, 5, 5)  # contiguous: read through a copy in p's layout
    g2 = torch.randn(5, 7).t()
    p2 = torch.randn(7, 5)
    expected = _float64_sgd([p, p2], [[g, g2]], 0.1, 0.9, 0.0, False, 0.0, False)
    bufs = [torch.zeros_like(p), torch.zeros_like(p2)]
    ops.fused_sgd_([p, p2], [g, g2], bufs, lr=0.1, momentum=0.9, first_step=True)
    assert p.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(p.double(), expected[0])
    torch.testing.assert_close(p2.double(), expected[1])


def test_thousand_tensor_list_matches_torch_sgd():
    g = torch.Generator().manual_seed(13)
    sizes = torch.randint(0, 2000, (1200,), generator=g).tolist()
    params = _params([(n,) for n in sizes])
    grads = _grads(params, 14)
    torch_params = [p.clone().requires_grad_() for p in params]
    for p, gr in zip(torch_params, grads):
        p.grad = gr.clone()
    torch.optim.SGD(torch_params, lr=0.1, momentum=0.9, weight_decay=1e-4, foreach=True).step()
    ops.fused_sgd_(params, grads, [torch.zeros_like(p) for p in params], lr=0.1, momentum=0.9,
                   weight_decay=1e-4, first_step=True)
    for mine, theirs in zip(params, torch_params):
        torch.testing.assert_close(mine, theirs.detach(), rtol=1e-6, atol=1e-6)


def _call(params, grads, bufs=None, updates=None, **kw):
    kw = {"lr": 0.1, **kw}
    ops.fused_sgd_(params, grads, bufs, update_out=updates, **kw)


def _aliased_flags():
    flag = torch.zeros(1)
    _call([torch.ones(3)], [torch.ones(3)], found_inf=flag, found_inf_out=flag)


@pytest.mark.parametrize("case,match", [
    (lambda: _call([torch.ones(3)], []), r"`grads` has 0 tensors but `params` has 1"),
    (lambda: _call([torch.ones(3)], [torch.ones(4)]), r"`grads\[0\]` must have the shape of `params\[0\]`"),
    (lambda: _call([torch.ones(3), torch.ones(2)], [torch.ones(3), torch.ones(2, dtype=torch.float64)]),
     r"`grads\[1\]` must have the dtype of `params\[1\]`"),
    (lambda: _call([torch.ones(3, dtype=torch.int64)], [torch.ones(3, dtype=torch.int64)]), r"`params\[0\]` must be float32"),
    (lambda: _call([torch.ones(3)], [torch.ones(3)], momentum=0.9), r"`momentum_buffers` needs one tensor per parameter"),
    (lambda: _call([torch.ones(3)], [torch.ones(3)], [torch.ones(2)], momentum=0.9),
     r"`momentum_buffers\[0\]` must have the shape of `params\[0\]`"),
    (lambda: _call([torch.ones(3)], [torch.ones(3)], updates=[torch.ones(3), torch.ones(3)]), r"`update_out` has 2 tensors"),
    (lambda: _call([torch.ones(3)], [torch.ones(3)], updates=[torch.ones(3, dtype=torch.float64)]),
     r"`update_out\[0\]` must have the dtype"),
    (lambda: _call([torch.ones(3)], [torch.ones(3)], nesterov=True), r"`nesterov` needs momentum > 0"),
    (lambda: _call([torch.ones(3)], [torch.ones(3)], lr=-1.0), r"`lr` must be >= 0"),
    (lambda: _call([torch.ones(3)], [torch.ones(3)], found_inf=torch.zeros(2)), r"`found_inf` must be a float32"),
    (lambda: _aliased_flags(), r"`found_inf` and `found_inf_out` must be different tensors"),
    (lambda: _call([torch.ones(5, 1).expand(5, 3)], [torch.ones(5, 3)]), r"`params\[0\]` must be non-overlapping and dense"),
    (lambda: _call([torch.ones(4, 4)], [torch.ones(4, 4)], [torch.ones(4, 4).t()], momentum=0.9),
     r"`momentum_buffers\[0\]` must have the dtype .* and strides"),
])
def test_bad_input_names_argument_and_index(case, match):
    with pytest.raises(ValueError, match=match):
        case()


def test_none_gradient_names_the_index():
    with pytest.raises(TypeError, match=r"`grads\[1\]` must be a tensor, got NoneType"):
        ops.fused_sgd_([torch.ones(2), torch.ones(3)], [torch.ones(2), None], lr=0.1)


def test_kernel_refuses_bad_input_itself():
    op = torch.ops.mpl_fast.fused_sgd_.default
    with pytest.raises(ValueError, match=r"`grads\[1\]` must have the shape of `params\[1\]`"):
        op([torch.ones(2), torch.ones(3)], [torch.ones(2), torch.ones(4)], [], [], lr=0.1)
    with pytest.raises(ValueError, match=r"`grads\[0\]` must be float32"):
        op([torch.ones(2)], [torch.ones(2, dtype=torch.int32)], [], [], lr=0.1)
    with pytest.raises(ValueError, match=r"`momentum_buffers` needs one tensor"):
        op([torch.ones(2)], [torch.ones(2)], [], [], lr=0.1, momentum=0.5)


class TestFusedSGD(OpTester):
    rtol, atol = 1e-6, 1e-6

    def sample_inputs(self, device):
        out = []
        for hyper in HYPER[:3]:
            params = [p.to(device) for p in _params([(5,), (3, 4), (2, 3, 3, 3)])]
            grads = _grads(params, 1)
            bufs = [torch.ones_like(p) for p in params] if hyper["momentum"] else []
            out.append(((params, grads, bufs), {"lr": 0.1, "update_out": [torch.empty_like(p) for p in params], **hyper}))
        return out

    def result(self, fn, args, kwargs):
        fn(*args, **kwargs)
        return args[0] + args[2] + kwargs["update_out"]  # what the op writes

    def function(self, *args, **kwargs):
        ops.fused_sgd_(*args, **kwargs)

    def reference(self, *args, **kwargs):
        ops.fused_sgd_reference_(*args, **kwargs)

    def opcheck_inputs(self, device):
        params = [p.to(device) for p in _params([(5,), (3, 4)])]
        args = (params, _grads(params, 1), [torch.zeros_like(p) for p in params], [torch.empty_like(p) for p in params])
        return [(torch.ops.mpl_fast.fused_sgd_.default, args,
                 {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}),
                (torch.ops.mpl_fast.fused_sgd_.default, args,
                 {"lr": 0.0, "lr_tensor": torch.tensor(0.05, device=device), "momentum": 0.9,
                  "found_inf": torch.zeros(1, device=device), "found_inf_out": torch.zeros(1, device=device)})]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_under_compile_fullgraph(backend):
    torch._dynamo.reset()

    def step(params, grads, bufs, updates, lr):
        ops.fused_sgd_(params, grads, bufs, lr=lr, momentum=0.9, nesterov=True, update_out=updates)
        return ops.multi_tensor_dot(grads, updates)

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    params = _params([(5,), (3, 4)])
    grads = _grads(params, 2)
    eager = [p.clone() for p in params]
    bufs, bufs_e = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    upd, upd_e = [torch.empty_like(p) for p in params], [torch.empty_like(p) for p in params]
    lr = torch.tensor(0.1)
    h = compiled(params, grads, bufs, upd, lr)
    h_e = step(eager, grads, bufs_e, upd_e, lr)
    for a, b in zip(params + bufs + upd, eager + bufs_e + upd_e):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(h, h_e)


# ------------------------------------------------------------------ FusedSGD


def _models(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    return model, copy.deepcopy(model)


def _train(model, opt, steps, seed=1, freeze_bias_at=None):
    g = torch.Generator().manual_seed(seed)
    for k in range(steps):
        x = torch.randn(8, 6, generator=g)
        opt.zero_grad()
        model(x).square().mean().backward()
        if freeze_bias_at is not None and k == freeze_bias_at:
            model[2].bias.grad = None
        opt.step()


@pytest.mark.parametrize("hyper", HYPER, ids=lambda h: "-".join(f"{k}{v}" for k, v in h.items()))
def test_fused_sgd_matches_torch_sgd_with_param_groups(hyper):
    ours, theirs = _models()
    groups = lambda m: [{"params": m[0].parameters()}, {"params": m[2].parameters(), "lr": 0.02}]  # noqa: E731
    opt = FusedSGD(groups(ours), lr=0.1, **hyper)
    ref = torch.optim.SGD(groups(theirs), lr=0.1, **hyper)
    _train(ours, opt, 5, freeze_bias_at=2)
    _train(theirs, ref, 5, freeze_bias_at=2)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert opt.state_dict()["param_groups"] == ref.state_dict()["param_groups"]


@pytest.mark.parametrize("direction", ["torch_to_fused", "fused_to_torch"])
def test_state_dict_round_trip(direction):
    (m1, m2), hyper = _models(), dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    first = (torch.optim.SGD if direction == "torch_to_fused" else FusedSGD)(m1.parameters(), **hyper)
    _train(m1, first, 3)
    m2.load_state_dict(m1.state_dict())
    second = (FusedSGD if direction == "torch_to_fused" else torch.optim.SGD)(m2.parameters(), **hyper)
    second.load_state_dict(copy.deepcopy(first.state_dict()))  # as from a checkpoint file
    assert set(second.state_dict()["state"][0]) == {"momentum_buffer"}
    _train(m1, first, 3, seed=5)
    _train(m2, second, 3, seed=5)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_keep_update_and_state_dict_without_it():
    model, _ = _models()
    opt = FusedSGD(model.parameters(), lr=0.1, momentum=0.9, keep_update=True)
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, 1, freeze_bias_at=0)
    for p, old, upd in zip(model.parameters(), before, opt.last_updates()):
        assert torch.equal(upd, p.detach() - old)
    assert not opt.last_updates()[-1].any()  # the bias had no gradient: Δθ = 0
    assert all("last_update" not in s for s in opt.state_dict()["state"].values())
    assert all("last_update" in opt.state[p] for p in list(model.parameters())[:-1])  # live state untouched
    with pytest.raises(RuntimeError, match="keep_update=True"):
        FusedSGD(model.parameters(), lr=0.1).last_updates()


def test_found_inf_skips_step_and_first_step_stays_exact():
    ours, theirs = _models()
    opt = FusedSGD(ours.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    ref = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    before = [p.detach().clone() for p in ours.parameters()]
    opt.zero_grad()
    ours(torch.randn(8, 6)).sum().backward()
    opt.step(found_inf=torch.ones(1))  # skipped first step: AMP found an inf
    assert all(torch.equal(p, b) for p, b in zip(ours.parameters(), before))
    _train(ours, opt, 3)
    _train(theirs, ref, 3)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_sync_free_amp_step_with_grad_scaler():
    """GradScaler.unscale_ finds the inf, FusedSGD.step(found_inf=...) skips on the device and
    GradScaler.update() backs the scale off: no .item() anywhere in the step."""
    model, _ = _models()
    opt = FusedSGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    before = [p.detach().clone() for p in model.parameters()]
    for poison in (True, False):
        opt.zero_grad()
        scaler.scale(model(torch.randn(8, 6)).square().mean()).backward()
        if poison:
            next(model.parameters()).grad[0, 0] = float("inf")
        scaler.unscale_(opt)
        found_inf = sum(scaler._found_inf_per_device(opt).values())
        opt.step(found_inf=found_inf)
        scaler.update()
        moved = [not torch.equal(p, b) for p, b in zip(model.parameters(), before)]
        assert not any(moved) if poison else all(moved)
    assert scaler.get_scale() == 512.0  # backed off once, for the poisoned step


def test_tensor_lr_and_scheduler():
    ours, theirs = _models()
    opt = FusedSGD(ours.parameters(), lr=torch.tensor(0.1), momentum=0.9)
    ref = torch.optim.SGD(theirs.parameters(), lr=torch.tensor(0.1), momentum=0.9)
    sched = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4) for o in (opt, ref)]
    for _ in range(3):
        _train(ours, opt, 1)
        _train(theirs, ref, 1)
        for s in sched:
            s.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_fused_sgd_on_the_reference_fallback(python_without_extension):
    """Without the extension FusedSGD still matches torch.optim.SGD (through fused_sgd_reference_)."""
    code = ("import warnings; warnings.simplefilter('ignore')\n"
            "import copy, torch, mpl_fast\n"
            "from mpl_fast.optim import FusedSGD\n"
            "torch.manual_seed(0)\n"
            "a = torch.nn.Linear(4, 3); b = copy.deepcopy(a)\n"
            "kw = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)\n"
            "oa, ob = FusedSGD(a.parameters(), keep_update=True, **kw), torch.optim.SGD(b.parameters(), **kw)\n"
            "for _ in range(3):\n"
            "    x = torch.randn(5, 4)\n"
            "    for m, o in ((a, oa), (b, ob)):\n"
            "        o.zero_grad(); m(x).square().sum().backward(); o.step()\n"
            "err = max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))\n"
            "print(mpl_fast.ops.backend(), err < 1e-6, oa.last_updates()[0].abs().sum().item() > 0)\n")
    stdout = python_without_extension(code)
    assert stdout.split() == ["reference", "True", "True"]


def test_constructor_validation_like_torch():
    params = [torch.nn.Parameter(torch.ones(2))]
    for kwargs in (dict(lr=-1.0), dict(momentum=-0.1), dict(weight_decay=-1.0), dict(nesterov=True)):
        with pytest.raises(ValueError):
            FusedSGD(params, **kwargs)
    with pytest.raises(RuntimeError, match="differentiable"):
        FusedSGD(params, differentiable=True)


# ------------------------------------------------------------------ CUDA (lent GPU only)


@pytest.mark.cuda
@pytest.mark.parametrize("hyper", HYPER[:3])
def test_cuda_matches_cpu_kernel(hyper):
    params = _params() * 3
    grads = _grads(params, 11)
    cpu = [p.clone() for p in params]
    gpu = [p.cuda() for p in params]
    bufs_c = [torch.zeros_like(p) for p in params] if hyper["momentum"] else None
    bufs_g = [b.cuda() for b in bufs_c] if bufs_c else None
    upd_c, upd_g = [torch.empty_like(p) for p in cpu], [torch.empty_like(p) for p in gpu]
    for k in range(2):
        ops.fused_sgd_(cpu, grads, bufs_c, lr=0.1, first_step=k == 0, update_out=upd_c, **hyper)
        ops.fused_sgd_(gpu, [g.cuda() for g in grads], bufs_g, lr=torch.tensor(0.1, device="cuda"),
                       first_step=k == 0, update_out=upd_g, **hyper)
    for a, b in zip(cpu + upd_c, gpu + upd_g):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
def test_cuda_found_inf_in_and_out_and_many_tensors():
    params = [p.cuda() for p in _params([(n,) for n in range(0, 3000, 2)])]
    grads = [g.cuda() for g in _grads(params, 12)]
    old = [p.clone() for p in params]
    flag_out = torch.zeros(1, device="cuda")
    ops.fused_sgd_(params, grads, None, lr=0.1, found_inf=torch.ones(1, device="cuda"), found_inf_out=flag_out)
    assert all(torch.equal(p, o) for p, o in zip(params, old))
    grads[700][3] = float("nan")
    ops.fused_sgd_(params, grads, None, lr=0.1, found_inf_out=flag_out)
    assert float(flag_out) == 1.0
    torch.testing.assert_close(params[5], old[5] - 0.1 * grads[5])


@pytest.mark.parametrize("copy_kind", ["deepcopy", "pickle"])
def test_a_copied_optimizer_keeps_keep_update_and_steps_the_same(copy_kind):
    """torch's Optimizer pickles only defaults, state and param_groups; FusedSGD's own flag
    (keep_update) must survive copy.deepcopy and pickle, and the copy must step like the original."""
    import io

    torch.manual_seed(0)
    p = torch.randn(5, 3, requires_grad=True)
    opt = FusedSGD([p], lr=0.1, momentum=0.9, keep_update=True)
    p.grad = torch.randn_like(p)
    opt.step()
    if copy_kind == "deepcopy":
        p2, opt2 = copy.deepcopy((p, opt))
    else:
        buf = io.BytesIO()
        torch.save((p, opt), buf)
        buf.seek(0)
        p2, opt2 = torch.load(buf, weights_only=False)
    assert opt2.keep_update
    for q, o in ((p, opt), (p2, opt2)):
        q.grad = torch.ones_like(q)
        o.step()
    assert torch.equal(p, p2)
    assert torch.equal(opt.last_updates()[0], opt2.last_updates()[0])


# ------------------------------------------------------------------ as a drop-in for torch.optim.SGD


def _embedding_models(seed=0):
    torch.manual_seed(seed)
    dense = torch.nn.Linear(4, 3)
    sparse = torch.nn.Embedding(10, 4, sparse=True)
    return torch.nn.ModuleDict({"emb": sparse, "lin": dense})


def _embedding_loss(model, ids):
    return model["lin"](model["emb"](ids)).square().mean()


@pytest.mark.parametrize("hyper", [dict(momentum=0.0), dict(momentum=0.9, nesterov=True),
                                   dict(momentum=0.5, dampening=0.2, maximize=True)], ids=str)
def test_sparse_gradients_step_like_torch_sgd(hyper):
    ours, theirs = _embedding_models(), _embedding_models()
    # The sparse group second: a step that refused it would have stepped the first group already.
    opt = FusedSGD([{"params": ours["lin"].parameters()}, {"params": ours["emb"].parameters()}], lr=0.1, **hyper)
    ref = torch.optim.SGD([{"params": theirs["lin"].parameters()}, {"params": theirs["emb"].parameters()}],
                          lr=0.1, **hyper)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        ids = torch.randint(10, (6,), generator=g)
        for model, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            _embedding_loss(model, ids).backward()
            o.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_a_refused_step_touches_no_tensor():
    first = torch.nn.Parameter(torch.ones(3))
    overlapping = torch.nn.Parameter(torch.ones(3, 1).expand(3, 4))  # torch.optim.SGD refuses it too
    opt = FusedSGD([{"params": [first]}, {"params": [overlapping]}], lr=0.1, momentum=0.9)
    first.grad, overlapping.grad = torch.ones(3), torch.ones(3, 4)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\].*overlap"):
        opt.step()
    assert torch.equal(first, torch.ones(3)) and not opt.state  # nothing moved, no state created


def test_non_dense_parameter_steps_like_torch_sgd():
    base = torch.randn(8, 12, generator=torch.Generator().manual_seed(0))
    ours, theirs = torch.nn.Parameter(base.clone()[:, ::2]), torch.nn.Parameter(base.clone()[:, ::2])
    assert not ours.is_contiguous()
    opt = FusedSGD([ours], lr=0.1, momentum=0.9, nesterov=True, keep_update=True)
    ref = torch.optim.SGD([theirs], lr=0.1, momentum=0.9, nesterov=True)
    for seed in range(3):
        grad = torch.randn(8, 6, generator=torch.Generator().manual_seed(seed + 1))
        before = ours.detach().clone()
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(opt.last_updates()[0], ours.detach() - before, rtol=0, atol=1e-6)


def test_channels_last_after_steps():
    torch.manual_seed(0)
    ours = torch.nn.Conv2d(3, 4, 3)
    theirs = copy.deepcopy(ours)
    opt = FusedSGD(ours.parameters(), lr=0.1, momentum=0.9, keep_update=True)
    ref = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        if step == 2:  # a layout change after the buffers exist (as model.to(channels_last) does)
            ours.to(memory_format=torch.channels_last)
            theirs.to(memory_format=torch.channels_last)
        x = torch.randn(2, 3, 6, 6, generator=g)
        for model, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            model(x).square().mean().backward()
            o.step()
    assert ours.weight.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_load_state_dict_keeps_keep_update():
    model, _ = _models()
    opt = FusedSGD(model.parameters(), lr=0.1, momentum=0.9, keep_update=True)
    _train(model, opt, 1)
    opt.load_state_dict(opt.state_dict())
    assert opt.keep_update
    _train(model, opt, 1)
    assert all(u is not None for u in opt.last_updates())


@pytest.mark.parametrize("copy_kind", ["deepcopy", "pickle", "torch.save"])
def test_a_copied_optimizer_leaves_last_update_out_of_its_state_dict(copy_kind):
    import io
    import pickle

    model, _ = _models()
    opt = FusedSGD(model.parameters(), lr=0.1, momentum=0.9, keep_update=True)
    _train(model, opt, 1)
    if copy_kind == "deepcopy":
        copied = copy.deepcopy(opt)
    elif copy_kind == "pickle":
        copied = pickle.loads(pickle.dumps(opt))
    else:
        buf = io.BytesIO()
        torch.save(opt, buf)
        buf.seek(0)
        copied = torch.load(buf, weights_only=False)
    assert all("last_update" in s for s in copied.state.values())  # live scratch kept
    assert all(set(s) == {"momentum_buffer"} for s in copied.state_dict()["state"].values())


def test_op_refuses_a_leaf_that_requires_grad_outside_no_grad():
    p = torch.ones(3, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"`params\[0\]` is a leaf .* requires grad"):
        ops.fused_sgd_([p], [torch.ones(3)], lr=0.1)
    assert torch.equal(p.detach(), torch.ones(3))
    with torch.no_grad():
        ops.fused_sgd_([p], [torch.ones(3)], lr=0.1)
    assert torch.equal(p.detach(), torch.full((3,), 0.9))


@pytest.mark.parametrize("case,match", [
    (lambda f: f([torch.ones(8, 12)[:, ::2]], [torch.ones(8, 6)]), r"`params\[0\]` must be non-overlapping and dense"),
    (lambda f: f([torch.ones(4, 4)], [torch.ones(4, 4)], [torch.ones(4, 4).t()], momentum=0.9),
     r"`momentum_buffers\[0\]` must have the dtype .* and strides"),
    (lambda f: f([torch.ones(4, 4)], [torch.ones(4, 4)], update_out=[torch.ones(4, 4).t()]),
     r"`update_out\[0\]` must have the dtype .* and strides"),
])
def test_kernel_and_reference_refuse_the_same_layouts(case, match):
    # Before, the reference stepped a non-dense parameter the kernel refuses: behaviour
    # depended on the backend. FusedSGD steps such parameters through a dense copy on both.
    for op in (ops.fused_sgd_, ops.fused_sgd_reference_):
        with pytest.raises(ValueError, match=match):
            case(lambda *a, **kw: op(*a, lr=0.1, **kw))
