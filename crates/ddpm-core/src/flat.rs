//! Parameters laid out in one contiguous buffer.
//!
//! libtorch's multi-tensor ("foreach" / fused) optimizer kernels are not exposed by `tch`,
//! and a per-parameter loop costs a dozen kernel launches per tensor per step. Instead each
//! variable is re-pointed (`set_data`) at a view of one flat `[N]` buffer, so AdamW, the
//! EMA update, the gradient norm and clipping are each a handful of ops over one tensor,
//! whatever the number of parameters.

use tch::{Kind, Tensor};

/// Variables (sorted by name) sharing one flat buffer.
#[derive(Debug)]
pub struct FlatParams {
    vars: Vec<Tensor>,
    flat: Tensor,
}

impl FlatParams {
    /// Moves `vars`' values into one buffer and makes each variable a view of it. Values,
    /// `requires_grad` and identity (the modules' handles) are unchanged.
    pub fn new(vars: Vec<Tensor>) -> Self {
        let _guard = tch::no_grad_guard();
        let pieces: Vec<Tensor> = vars.iter().map(|v| v.detach().reshape([-1])).collect();
        let flat = Tensor::cat(&pieces, 0); // [N]
        let mut offset = 0;
        for v in &vars {
            let n = v.numel() as i64;
            let view = flat.narrow(0, offset, n).view(v.size().as_slice());
            let mut handle = v.shallow_clone();
            handle.set_data(&view);
            offset += n;
        }
        FlatParams { vars, flat }
    }

    /// The `[N]` buffer; writing to it writes the variables.
    pub fn flat(&self) -> &Tensor {
        &self.flat
    }

    pub fn len(&self) -> i64 {
        self.flat.numel() as i64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The gradients as one `[N]` tensor (zeros where a variable got none).
    pub fn flat_grad(&self) -> Tensor {
        let grads: Vec<Tensor> = self
            .vars
            .iter()
            .map(|v| {
                let g = v.grad();
                if g.defined() {
                    g.reshape([-1])
                } else {
                    Tensor::zeros([v.numel() as i64], (Kind::Float, v.device()))
                }
            })
            .collect();
        Tensor::cat(&grads, 0)
    }

    /// Drops every gradient (the next backward allocates fresh ones).
    pub fn zero_grad(&mut self) {
        for v in &mut self.vars {
            v.zero_grad();
        }
    }
}
