//! The run-history routes' query parameters: [`RunsQuery`] (a page of runs) and
//! [`MetricsQuery`] (a metric series), each checked into what the registry is asked for.
//! Each parameter's schema states the bounds enforced here, from the same constants.

use ddpm_registry::RunStatus;
use serde::Deserialize;
use utoipa::{
    openapi::{ObjectBuilder, Type},
    IntoParams,
};

use super::{integral, ValidationError};

/// Runs per page when the client gives no `limit`.
pub const DEFAULT_LIMIT: i64 = 50;
pub const MAX_LIMIT: i64 = 500;
/// Metric points when the client gives no `max_points`.
pub const DEFAULT_MAX_POINTS: usize = 500;
pub const MAX_POINTS: usize = 10_000;

/// `GET /v1/runs`' query.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RunsQuery {
    /// Only runs in this status.
    #[param(schema_with = status_schema)]
    pub status: Option<String>,
    /// Runs per page.
    #[serde(default, deserialize_with = "integral::query::i64")]
    #[param(schema_with = limit_schema)]
    pub limit: Option<i64>,
    /// Runs to skip, newest first.
    #[serde(default, deserialize_with = "integral::query::i64")]
    #[param(schema_with = offset_schema)]
    pub offset: Option<i64>,
}

/// A page of runs, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunsFilter {
    pub status: Option<RunStatus>,
    pub limit: i64,
    pub offset: i64,
}

impl RunsQuery {
    pub fn validate(&self) -> Result<RunsFilter, ValidationError> {
        let status = self
            .status
            .as_deref()
            .map(|s| {
                s.parse::<RunStatus>().map_err(|_| {
                    ValidationError::Status(format!(
                        "unknown status {s:?}: use queued, running, completed, failed or interrupted"
                    ))
                })
            })
            .transpose()?;
        let limit = self.limit.unwrap_or(DEFAULT_LIMIT);
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(ValidationError::Query(format!(
                "limit must be in 1..={MAX_LIMIT}, got {limit}"
            )));
        }
        let offset = self.offset.unwrap_or(0);
        if offset < 0 {
            return Err(ValidationError::Query(format!(
                "offset must not be negative, got {offset}"
            )));
        }
        Ok(RunsFilter {
            status,
            limit,
            offset,
        })
    }
}

/// `GET /v1/runs/{id}/metrics`' query.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct MetricsQuery {
    /// The first step to include.
    #[serde(default, deserialize_with = "integral::query::i64")]
    #[param(schema_with = step_schema)]
    pub from_step: Option<i64>,
    /// The last step to include. A range that ends before it starts is empty.
    #[serde(default, deserialize_with = "integral::query::i64")]
    #[param(schema_with = step_schema)]
    pub to_step: Option<i64>,
    /// At most this many points, evenly spaced, the newest always included.
    #[serde(default, deserialize_with = "integral::query::i64")]
    #[param(schema_with = max_points_schema)]
    pub max_points: Option<i64>,
}

/// A metric series' range, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsRange {
    pub from_step: Option<i64>,
    pub to_step: Option<i64>,
    pub max_points: usize,
}

impl MetricsRange {
    /// True when no step can fall in the range: `from_step` after `to_step`.
    pub fn is_empty(&self) -> bool {
        matches!((self.from_step, self.to_step), (Some(from), Some(to)) if from > to)
    }
}

impl MetricsQuery {
    /// A range that ends before it starts is valid and empty: two independent bounds are
    /// what the document can describe, and a filter matching nothing is not an error.
    pub fn validate(&self) -> Result<MetricsRange, ValidationError> {
        let max_points = self.max_points.unwrap_or(DEFAULT_MAX_POINTS as i64);
        let max_points = usize::try_from(max_points)
            .ok()
            .filter(|m| (1..=MAX_POINTS).contains(m))
            .ok_or_else(|| {
                ValidationError::Query(format!(
                    "max_points must be in 1..={MAX_POINTS}, got {max_points}"
                ))
            })?;
        Ok(MetricsRange {
            from_step: self.from_step,
            to_step: self.to_step,
            max_points,
        })
    }
}

fn status_schema() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(RunStatus::ALL.map(RunStatus::as_str)))
}

fn limit_schema() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .minimum(Some(1))
        .maximum(Some(MAX_LIMIT))
        .default(Some(DEFAULT_LIMIT.into()))
}

fn offset_schema() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .minimum(Some(0))
        .maximum(Some(i64::MAX))
        .default(Some(0.into()))
}

/// Any 64-bit step: the bounds are stated because a larger number does not parse.
fn step_schema() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .minimum(Some(i64::MIN))
        .maximum(Some(i64::MAX))
}

fn max_points_schema() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .minimum(Some(1))
        .maximum(Some(MAX_POINTS))
        .default(Some(DEFAULT_MAX_POINTS.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_query_bounds() {
        let q = |status: Option<&str>, limit, offset| RunsQuery {
            status: status.map(str::to_owned),
            limit,
            offset,
        };
        assert_eq!(
            q(None, None, None).validate().unwrap(),
            RunsFilter {
                status: None,
                limit: DEFAULT_LIMIT,
                offset: 0
            }
        );
        assert!(q(Some("running"), Some(MAX_LIMIT), Some(i64::MAX))
            .validate()
            .is_ok());
        assert!(matches!(
            q(Some("sleeping"), None, None).validate(),
            Err(ValidationError::Status(_))
        ));
        for (limit, offset) in [
            (Some(0), None),
            (Some(MAX_LIMIT + 1), None),
            (None, Some(-1)),
        ] {
            assert!(matches!(
                q(None, limit, offset).validate(),
                Err(ValidationError::Query(_))
            ));
        }
    }

    #[test]
    fn metrics_query_bounds() {
        let q = |from_step, to_step, max_points| MetricsQuery {
            from_step,
            to_step,
            max_points,
        };
        let range = q(Some(10), Some(5), None).validate().unwrap();
        assert!(range.is_empty());
        assert_eq!(range.max_points, DEFAULT_MAX_POINTS);
        assert!(!q(Some(5), Some(5), Some(MAX_POINTS as i64))
            .validate()
            .unwrap()
            .is_empty());
        assert!(!q(Some(i64::MIN), None, Some(1))
            .validate()
            .unwrap()
            .is_empty());
        for max_points in [-1, 0, MAX_POINTS as i64 + 1] {
            assert!(q(None, None, Some(max_points)).validate().is_err());
        }
    }
}
