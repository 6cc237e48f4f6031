//! Classifier-free guidance (Ho & Salimans 2022) in one forward pass.
//!
//! ε̃ = ε(x, ∅) + w·(ε(x, y) − ε(x, ∅)), with a guidance scale w per sample. The
//! conditional and unconditional inputs go through the network as one batch; samples that
//! need no unconditional half (w = 1, or no class) are not duplicated, so a batch of B
//! costs a forward pass of B + k where k samples are guided.
//!
//! With a guidance rescale φ (Lin et al. 2024, diffusers' `guidance_rescale`) a guided
//! sample's ε̃ is rescaled to the standard deviation of its conditional ε(x, y), and mixed:
//! ε̃ ← φ·ε̃·std(ε_y)/std(ε̃) + (1 − φ)·ε̃ ([`rescale_guidance`]).
//!
//! Every tensor operation here is a fallible `f_*` one: a libtorch failure comes back as a
//! [`CoreError`] whose [`crate::DeviceFault`] says whether the device survived it. Only the
//! network's own forward pass (`UNet::forward`) may still panic.

use tch::{Device, Kind, Tensor};

use crate::{
    error::{CoreError, Result},
    unet::Model,
};

/// Whether sample `i` needs the unconditional prediction.
fn needs_uncond(label: i64, null: Option<i64>, w: f64) -> bool {
    null.is_some_and(|n| label != n) && w != 1.0
}

/// ε̃ for `x: [B, C, H, W]` at `t: [B]`, with per-sample `labels` (the null label for
/// "no class"), guidance scales and guidance rescales φ (empty: φ = 0 for all). Call under
/// `tch::no_grad`.
pub fn guided_epsilon(
    model: &Model,
    x: &Tensor,
    t: &Tensor,
    labels: &[i64],
    guidance_scales: &[f64],
    guidance_rescales: &[f64],
) -> Result<Tensor> {
    let b = x.size()[0];
    if labels.len() as i64 != b || guidance_scales.len() as i64 != b {
        return Err(CoreError::Input(format!(
            "{} labels and {} guidance scales for a batch of {b}",
            labels.len(),
            guidance_scales.len()
        )));
    }
    if !guidance_rescales.is_empty() && guidance_rescales.len() as i64 != b {
        return Err(CoreError::Input(format!(
            "{} guidance rescales for a batch of {b}",
            guidance_rescales.len()
        )));
    }
    if let Some(w) = guidance_scales.iter().find(|w| !w.is_finite()) {
        return Err(CoreError::Input(format!(
            "guidance scale {w} is not finite"
        )));
    }
    let device = x.device();
    let null = model.config().null_label();
    // Validate labels on the host: checking the tensor would sync with the GPU every step.
    if let Some(n) = null {
        if let Some(l) = labels.iter().find(|&&l| !(0..=n).contains(&l)) {
            return Err(CoreError::Input(format!(
                "label {l} is outside 0..={n} (null = {n})"
            )));
        }
    }
    check_input(model, x, t)?;
    let labels_t = Tensor::f_from_slice(labels)?.f_to_device(device)?;
    let guided: Vec<i64> = (0..b)
        .filter(|&i| needs_uncond(labels[i as usize], null, guidance_scales[i as usize]))
        .collect();
    if guided.is_empty() {
        return Ok(model.net.forward(x, t, Some(&labels_t)));
    }
    let k = guided.len() as i64;
    let all = k == b;
    let (x_u, t_u) = if all {
        (x.shallow_clone(), t.shallow_clone())
    } else {
        let idx = Tensor::f_from_slice(&guided)?.f_to_device(device)?;
        (x.f_index_select(0, &idx)?, t.f_index_select(0, &idx)?)
    };
    let null_labels = Tensor::f_full([k], null.unwrap_or(0), (Kind::Int64, device))?;
    let x_in = Tensor::f_cat(&[x, &x_u], 0)?; // [B + k, C, H, W]
    let t_in = Tensor::f_cat(&[t, &t_u], 0)?;
    let l_in = Tensor::f_cat(&[&labels_t, &null_labels], 0)?;
    let out = model.net.forward(&x_in, &t_in, Some(&l_in));
    let cond = out.f_narrow(0, 0, b)?; // [B, C, H, W]
    let uncond = out.f_narrow(0, b, k)?; // [k, C, H, W]
    let w: Vec<f32> = guided
        .iter()
        .map(|&i| guidance_scales[i as usize] as f32)
        .collect();
    let w = Tensor::f_from_slice(&w)?
        .f_to_device(device)?
        .f_view([k, 1, 1, 1])?;
    let phi: Vec<f64> = guided
        .iter()
        .map(|&i| guidance_rescales.get(i as usize).copied().unwrap_or(0.0))
        .collect();
    let rescaled = |mixed: Tensor, cond: &Tensor| -> Result<Tensor> {
        if phi.iter().all(|&p| p == 0.0) {
            Ok(mixed)
        } else {
            rescale_guidance(&mixed, cond, &phi)
        }
    };
    if all {
        // torch.lerp(uncond, cond, w) = uncond + w·(cond − uncond).
        return rescaled(uncond.f_lerp_tensor(&cond, &w)?, &cond);
    }
    let idx = Tensor::f_from_slice(&guided)?.f_to_device(device)?;
    let cond_sel = cond.f_index_select(0, &idx)?;
    let mixed = rescaled(uncond.f_lerp_tensor(&cond_sel, &w)?, &cond_sel)?;
    Ok(cond.f_index_copy(0, &idx, &mixed)?)
}

/// Guidance rescale (Lin et al. 2024, §3.4; diffusers' `rescale_noise_cfg`): each row of
/// `guided` (`[B, …]`) scaled to the standard deviation (unbiased, over all but the batch
/// dimension) of the same row of `cond`, mixed with itself by its φ in `phi`.
pub fn rescale_guidance(guided: &Tensor, cond: &Tensor, phi: &[f64]) -> Result<Tensor> {
    let size = guided.size();
    let b = size.first().copied().unwrap_or(0);
    if phi.len() as i64 != b || cond.size() != size {
        return Err(CoreError::Input(format!(
            "{} rescales, guided {size:?} and conditional {:?}",
            phi.len(),
            cond.size()
        )));
    }
    let dims: Vec<i64> = (1..size.len() as i64).collect();
    let std = |x: &Tensor| x.f_std_dim(dims.as_slice(), true, true);
    let ratio = std(cond)?.f_div(&std(guided)?)?; // [B, 1, …]
    let rescaled = guided.f_mul(&ratio)?;
    let mut shape = vec![1i64; size.len()];
    shape[0] = b;
    let phi = Tensor::f_from_slice(phi)?
        .f_to_kind(guided.kind())?
        .f_to_device(guided.device())?
        .f_view(shape.as_slice())?; // [B, 1, …]
                                    // (1 − φ)·guided + φ·rescaled
    Ok(guided.f_lerp_tensor(&rescaled, &phi)?)
}

/// Shape checks that need no device sync: x is `[B, C, S, S]` for the model, t is `[B]`.
fn check_input(model: &Model, x: &Tensor, t: &Tensor) -> Result<()> {
    let cfg = model.config();
    let size = x.size();
    if size.len() != 4 || size[1..] != [cfg.in_channels, cfg.image_size, cfg.image_size] {
        return Err(CoreError::Input(format!(
            "x has shape {size:?}, the model takes [B, {}, {}, {}]",
            cfg.in_channels, cfg.image_size, cfg.image_size
        )));
    }
    if t.size() != [size[0]] {
        return Err(CoreError::Input(format!(
            "t has shape {:?}, expected [{}]",
            t.size(),
            size[0]
        )));
    }
    Ok(())
}

/// A `[B]` int64 tensor of timesteps on `device`.
pub(crate) fn timestep_tensor(timesteps: &[i64], device: Device) -> Result<Tensor> {
    Ok(Tensor::f_from_slice(timesteps)?.f_to_device(device)?)
}
