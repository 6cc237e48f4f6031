//! What each step of a sample costs in network evaluations (batch rows): what a server
//! prices work with and fits its pass times on. A guided conditional sample costs 2 rows
//! (its conditional and unconditional halves) at the steps inside its guidance interval
//! and 1 outside it; any other sample costs 1 at every step.
//!
//! Pricing every step at 2 would overstate a request, and worse, label the cheap passes
//! outside the interval as full ones, so that a pass-time fit taken while samples are in
//! their unguided phase underestimates the guided passes to come.

use super::{SampleSpec, SamplerConfig};
use crate::error::Result;

/// Batch rows of each step of one sample's plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepRows {
    steps: usize,
    /// Rows of a guided step: 2, or 1 for a sample that guidance never doubles.
    guided_rows: usize,
    /// The guided steps, `from..to`. They are contiguous: the plan's timesteps decrease
    /// and the interval is one range of timesteps.
    guided_from: usize,
    guided_to: usize,
}

impl StepRows {
    /// Steps in the plan.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// Rows of step `step` (0-based); 0 past the end.
    pub fn at(&self, step: usize) -> usize {
        if step >= self.steps {
            0
        } else if (self.guided_from..self.guided_to).contains(&step) {
            self.guided_rows
        } else {
            1
        }
    }

    /// Rows of steps `step..`: the work left once `step` steps are taken.
    pub fn from(&self, step: usize) -> usize {
        let left = self.steps.saturating_sub(step);
        let guided_left = self.guided_to.saturating_sub(step.max(self.guided_from));
        left + guided_left * (self.guided_rows - 1)
    }
}

impl SamplerConfig {
    /// Whether guidance applies at timestep `t` (everywhere without an interval).
    pub(super) fn guides_at(&self, t: i64) -> bool {
        self.guidance_interval
            .is_none_or(|(lo, hi)| (lo..=hi).contains(&t))
    }
}

impl SampleSpec {
    /// Rows of each step of this sample's plan over a schedule of `t_max` timesteps: the
    /// same steps, and the same guided ones, as [`SamplerConfig::plan`]'s, without the
    /// schedule itself (a server prices a request without waiting for the model).
    pub fn step_rows(&self, t_max: usize) -> Result<StepRows> {
        let sampler = &self.sampler;
        sampler.validate_for(t_max)?;
        let timesteps = sampler
            .spacing
            .timesteps_for(sampler.kind, t_max, sampler.steps);
        let guides = |t: &i64| sampler.guides_at(*t);
        // A span, so an upper bound were the steps ever not contiguous; the tests check
        // that they are.
        let (guided_from, guided_to) = match (
            timesteps.iter().position(guides),
            timesteps.iter().rposition(guides),
        ) {
            (Some(from), Some(last)) => (from, last + 1),
            _ => (0, 0),
        };
        Ok(StepRows {
            steps: timesteps.len(),
            guided_rows: self.rows_per_step(),
            guided_from,
            guided_to,
        })
    }
}

#[cfg(test)]
mod tests {
    use tch::Device;

    use super::*;
    use crate::{
        sampler::{SamplerKind, TimestepSpacing},
        schedule::{NoiseSchedule, ScheduleConfig},
    };

    fn spec(sampler: SamplerConfig, label: Option<i64>, w: f64) -> SampleSpec {
        SampleSpec {
            label,
            guidance_scale: w,
            seed: 0,
            sampler,
        }
    }

    #[test]
    fn rows_follow_the_plans_guided_steps_for_every_sampler_spacing_and_interval() {
        let schedule = NoiseSchedule::new(ScheduleConfig::default(), Device::Cpu).unwrap();
        let kinds = [SamplerKind::Ddpm, SamplerKind::Ddim, SamplerKind::DpmPp2m];
        let spacings = [
            TimestepSpacing::Leading,
            TimestepSpacing::Trailing,
            TimestepSpacing::Linspace,
        ];
        let intervals = [
            None,
            Some((80, 580)),
            Some((0, 0)),
            Some((500, 999)),
            Some((3, 7)),
        ];
        let mut some_unguided = false;
        for kind in kinds {
            for spacing in spacings {
                for steps in [1, 2, 7, 10, 50, 250, 1000] {
                    for interval in intervals {
                        let mut sampler = SamplerConfig::ddim(steps);
                        sampler.kind = kind;
                        sampler.spacing = spacing;
                        sampler.guidance_interval = interval;
                        let plan = sampler.plan(&schedule).unwrap();
                        for (label, w) in [(Some(1), 3.0), (Some(1), 1.0), (None, 3.0)] {
                            let spec = spec(sampler, label, w);
                            let rows = spec.step_rows(schedule.timesteps()).unwrap();
                            let case = format!("{kind:?} {spacing:?} {steps} {interval:?} {w}");
                            assert_eq!(rows.steps(), plan.len(), "{case}");
                            let each: Vec<usize> = plan
                                .iter()
                                .map(|p| if p.guided { spec.rows_per_step() } else { 1 })
                                .collect();
                            some_unguided |= each.contains(&1) && each.contains(&2);
                            for i in 0..=plan.len() {
                                assert_eq!(rows.at(i), each.get(i).copied().unwrap_or(0), "{case}");
                                assert_eq!(rows.from(i), each[i..].iter().sum::<usize>(), "{case}");
                            }
                        }
                    }
                }
            }
        }
        assert!(some_unguided, "no case mixed guided and unguided steps");
    }

    #[test]
    fn an_invalid_sampler_is_refused_as_the_plan_is() {
        let mut sampler = SamplerConfig::ddpm(10);
        sampler.guidance_interval = Some((10, 5));
        assert!(spec(sampler, Some(0), 3.0).step_rows(1000).is_err());
    }
}
