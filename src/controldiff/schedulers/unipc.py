"""UniPC multistep (Zhao et al. 2023): UniP predictor + UniC corrector, bh1/bh2 variants."""
from __future__ import annotations

import numpy as np
import torch

from .base import SigmaScheduler, expand_to, karras_sigmas, require, sigma_to_t, spaced_timesteps, train_sigmas
from .dpmsolver import log_snr
from .prediction import alpha_sigma, x0_eps


class UniPC(SigmaScheduler):
    name = "unipc"
    CLASS_NAME = "UniPCMultistepScheduler"
    _missing_timestep_is_last = True
    DEFAULTS = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        solver_order=2, prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
        sample_max_value=1.0, predict_x0=True, solver_type="bh2", lower_order_final=True, disable_corrector=[],
        solver_p=None, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
        use_flow_sigmas=False, flow_shift=1.0, timestep_spacing="linspace", steps_offset=0,
        final_sigmas_type="zero", rescale_betas_zero_snr=False, use_dynamic_shifting=False,
        time_shift_type="exponential", sigma_min=None, sigma_max=None, shift_terminal=None,
    )

    def __init__(self, config=None, **overrides) -> None:
        super().__init__(config, **overrides)
        if self.config.solver_type in ("midpoint", "heun", "logrho"):  # other solvers' names, as the reference
            self.config["solver_type"] = "bh2"
        require(self.config, "solver_type", ("bh1", "bh2"))
        require(self.config, "prediction_type", ("epsilon", "sample", "v_prediction"))
        require(self.config, "final_sigmas_type", ("zero", "sigma_min"))
        require(self.config, "solver_p", (None,))
        require(self.config, "shift_terminal", (None,))
        self.predict_x0 = self.config.predict_x0
        self.disable_corrector = list(self.config.disable_corrector or [])
        self._train_schedule()
        self._reset()

    def _reset(self) -> None:
        self.model_outputs: list[torch.Tensor | None] = [None] * self.config.solver_order
        self.lower_order_nums = 0
        self.last_sample = None
        self.this_order = 0
        self._step_index = None
        self._begin_index = None

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        cfg = self.config
        timesteps = spaced_timesteps(cfg, num_inference_steps, solver=True).astype(np.int64)
        sigmas = train_sigmas(self.alphas_cumprod)
        if cfg.use_karras_sigmas:
            log_sigmas = np.log(sigmas)
            sigmas = karras_sigmas(np.flip(sigmas).copy(), num_inference_steps, cfg.sigma_min, cfg.sigma_max)
            timesteps = np.array([sigma_to_t(s, log_sigmas) for s in sigmas]).round()
            sigma_last = sigmas[-1] if cfg.final_sigmas_type == "sigma_min" else 0
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
            if cfg.final_sigmas_type == "sigma_min":
                sigma_last = ((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5
            else:
                sigma_last = 0
        sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
        self.sigmas = torch.from_numpy(sigmas).to(device=device)
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.int64)
        self.num_inference_steps = len(timesteps)
        self._reset()

    def _convert(self, model_output, sample):
        """x0 prediction (predict_x0, the default) or epsilon prediction."""
        alpha_t, sigma_t = alpha_sigma(self.sigmas[self._step_index])
        x0, eps = x0_eps(self.config.prediction_type, model_output, sample, alpha_t, sigma_t)
        return x0 if self.predict_x0 else eps

    def _bh_terms(self, h, rks_list, order, device):
        """Shared UniP/UniC pieces: R (Vandermonde in r_k), b, h_phi_1 and B(h)."""
        rks = torch.stack(rks_list + [torch.ones((), device=device)])
        hh = -h if self.predict_x0 else h
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        factorial_i = 1
        B_h = hh if self.config.solver_type == "bh1" else torch.expm1(hh)
        R, b = [], []
        for i in range(1, order + 1):
            R.append(torch.pow(rks, i - 1))
            b.append(h_phi_k * factorial_i / B_h)
            factorial_i *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial_i
        R = torch.stack(R)
        b = torch.stack(b) if len(b) > 0 else torch.tensor(b, device=device)
        return R, b, h_phi_1, B_h

    def _base(self, x, m0, alpha_t, sigma_t, alpha_s0, sigma_s0, h_phi_1):
        if self.predict_x0:
            return sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
        return alpha_t / alpha_s0 * x - sigma_t * h_phi_1 * m0

    def _predictor(self, sample, order):
        """UniP: explicit step from sigma_s0 to sigma_t using the stored outputs."""
        outs, i, device = self.model_outputs, self._step_index, sample.device
        m0, x = outs[-1], sample
        alpha_t, sigma_t, lambda_t = log_snr(self.sigmas[i + 1].to(device))
        alpha_s0, sigma_s0, lambda_s0 = log_snr(self.sigmas[i].to(device))
        h = lambda_t - lambda_s0
        rks, D1s = [], []
        for k in range(1, order):
            _, _, lambda_si = log_snr(self.sigmas[i - k].to(device))
            rk = (lambda_si - lambda_s0) / h
            rks.append(rk)
            D1s.append((outs[-(k + 1)] - m0) / rk)
        R, b, h_phi_1, B_h = self._bh_terms(h, rks, order, device)
        x_t_ = self._base(x, m0, alpha_t, sigma_t, alpha_s0, sigma_s0, h_phi_1)
        if D1s:
            D1s = torch.stack(D1s, dim=1)
            if order == 2:
                rhos_p = torch.ones(1, dtype=x.dtype, device=device) * 0.5
            else:
                rhos_p = torch.linalg.solve(R[:-1, :-1], b[:-1]).to(device).to(x.dtype)
            pred_res = torch.einsum("k,bkc...->bc...", rhos_p, D1s)
        else:
            pred_res = 0
        scale = alpha_t if self.predict_x0 else sigma_t
        return (x_t_ - scale * B_h * pred_res).to(x.dtype)

    def _corrector(self, model_t, last_sample, this_sample, order):
        """UniC: refine this_sample with the new model output (no extra model call)."""
        outs, i, device = self.model_outputs, self._step_index, this_sample.device
        m0, x = outs[-1], last_sample
        alpha_t, sigma_t, lambda_t = log_snr(self.sigmas[i].to(device))
        alpha_s0, sigma_s0, lambda_s0 = log_snr(self.sigmas[i - 1].to(device))
        h = lambda_t - lambda_s0
        rks, D1s = [], []
        for k in range(1, order):
            _, _, lambda_si = log_snr(self.sigmas[i - (k + 1)].to(device))
            rk = (lambda_si - lambda_s0) / h
            rks.append(rk)
            D1s.append((outs[-(k + 1)] - m0) / rk)
        R, b, h_phi_1, B_h = self._bh_terms(h, rks, order, device)
        D1s = torch.stack(D1s, dim=1) if D1s else None
        if order == 1:
            rhos_c = torch.ones(1, dtype=x.dtype, device=device) * 0.5
        else:
            rhos_c = torch.linalg.solve(R, b).to(device).to(x.dtype)
        x_t_ = self._base(x, m0, alpha_t, sigma_t, alpha_s0, sigma_s0, h_phi_1)
        corr_res = torch.einsum("k,bkc...->bc...", rhos_c[:-1], D1s) if D1s is not None else 0
        D1_t = model_t - m0
        scale = alpha_t if self.predict_x0 else sigma_t
        return (x_t_ - scale * B_h * (corr_res + rhos_c[-1] * D1_t)).to(x.dtype)

    def step(self, model_output, timestep, sample, generator=None, eta: float = 0.0):
        if self.num_inference_steps is None:
            raise ValueError("set_timesteps must be called before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        use_corrector = i > 0 and (i - 1) not in self.disable_corrector and self.last_sample is not None
        converted = self._convert(model_output, sample)
        if use_corrector:
            sample = self._corrector(converted, self.last_sample, sample, self.this_order)
        self.model_outputs = self.model_outputs[1:] + [converted]
        order = self.config.solver_order
        if self.config.lower_order_final:
            order = min(order, len(self.timesteps) - i)
        self.this_order = min(order, self.lower_order_nums + 1)
        self.last_sample = sample
        prev_sample = self._predictor(sample, self.this_order)
        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        if self.predict_x0:
            self.pred_original_sample = converted
        return prev_sample

    def add_noise(self, original, noise, timesteps):
        sigmas = self.sigmas.to(device=original.device, dtype=original.dtype)
        sigma = expand_to(sigmas[self._step_indices(timesteps, original.device)], original)
        alpha_t, sigma_t = alpha_sigma(sigma)
        return alpha_t * original + sigma_t * noise
