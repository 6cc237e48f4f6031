//! Parameters laid out in one contiguous buffer.
//!
//! libtorch's multi-tensor ("foreach" / fused) optimizer kernels are not exposed by `tch`,
//! and a per-parameter loop costs a dozen kernel launches per tensor per step. Instead each
//! variable is re-pointed (`set_data`) at a view of one flat `[N]` buffer, so AdamW, the
//! EMA update, the gradient norm and clipping are each a handful of ops over one tensor,
//! whatever the number of parameters.
//!
//! Gradients get the same treatment: after the first backward pass every variable's
//! `.grad` is re-pointed at a view of one flat gradient buffer. Autograd accumulates into
//! an existing gradient in place, so later backward passes write straight into that
//! buffer: no concatenation per step, and zeroing is one `zero_()`.

use tch::{Kind, Tensor};

/// Variables (sorted by name) sharing one flat buffer.
#[derive(Debug)]
pub struct FlatParams {
    vars: Vec<Tensor>,
    flat: Tensor,
    /// `[N]`, the variables' gradients as views, once every variable has had one.
    flat_grad: Option<Tensor>,
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
        FlatParams {
            vars,
            flat,
            flat_grad: None,
        }
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

    /// The gradients as one `[N]` tensor (zeros where a variable got none). The first
    /// call after every variable has a gradient binds them to one buffer (see the module
    /// doc); from then on this is that buffer, no copy.
    pub fn flat_grad(&mut self) -> Tensor {
        if let Some(g) = &self.flat_grad {
            return g.shallow_clone();
        }
        let _guard = tch::no_grad_guard();
        let grads: Vec<Tensor> = self.vars.iter().map(Tensor::grad).collect();
        let all_defined = grads.iter().all(Tensor::defined);
        let pieces: Vec<Tensor> = grads
            .iter()
            .zip(&self.vars)
            .map(|(g, v)| {
                if g.defined() {
                    g.reshape([-1])
                } else {
                    Tensor::zeros([v.numel() as i64], (Kind::Float, v.device()))
                }
            })
            .collect();
        let flat = Tensor::cat(&pieces, 0); // [N]
        if all_defined {
            let mut offset = 0;
            for (g, v) in grads.iter().zip(&self.vars) {
                let n = v.numel() as i64;
                let mut handle = g.shallow_clone();
                handle.set_data(&flat.narrow(0, offset, n).view(v.size().as_slice()));
                offset += n;
            }
            self.flat_grad = Some(flat.shallow_clone());
        }
        flat
    }

    /// Zeroes every gradient (in one op once they are bound to the flat buffer).
    pub fn zero_grad(&mut self) {
        match &mut self.flat_grad {
            Some(g) => {
                let _ = g.zero_();
            }
            None => {
                for v in &mut self.vars {
                    v.zero_grad();
                }
            }
        }
    }
}
