//! Where checkpoints are stored: a directory (the default) or an S3-compatible bucket,
//! chosen by `--store`'s URL, with the S3 settings under their conventional `AWS_*`
//! names. Plain data: `ddpm-registry` opens the store it describes ([`StoreSpec`]).

use std::{fmt, path::PathBuf, time::Duration};

/// `--store` and the S3 settings, flattened into [`CommonOptions`](crate::CommonOptions).
#[derive(Clone, Default, clap::Args)]
pub struct StoreOptions {
    /// Checkpoint store: `s3://bucket/prefix` for S3-compatible object storage, or a
    /// directory (a path or `file:///path`); default: the directory `--checkpoint-dir`.
    #[arg(long, env = "DDPM_STORE", global = true, value_parser = parse_store_url)]
    pub store: Option<StoreUrl>,

    /// S3 endpoint URL, for an S3-compatible server (MinIO, Ceph, R2, GCS's XML API, a
    /// test server); default: AWS's endpoint for the region.
    #[arg(long, env = "AWS_ENDPOINT_URL", global = true)]
    pub s3_endpoint: Option<String>,

    /// S3 region.
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1", global = true)]
    pub s3_region: String,

    /// Address buckets as `bucket.host` (virtual-hosted style, what AWS prefers) rather
    /// than `host/bucket` (path style, what most S3-compatible servers need).
    #[arg(long, env = "AWS_VIRTUAL_HOSTED_STYLE_REQUEST", global = true)]
    pub s3_virtual_hosted_style: bool,

    /// Allow plain `http://` endpoints (a server on a private network or a test server).
    #[arg(long, env = "AWS_ALLOW_HTTP", global = true)]
    pub s3_allow_http: bool,

    /// S3 access key id; default: the instance's or pod's credentials (IMDS, web identity).
    #[arg(long, env = "AWS_ACCESS_KEY_ID", global = true)]
    pub aws_access_key_id: Option<String>,

    /// S3 secret access key.
    #[arg(
        long,
        env = "AWS_SECRET_ACCESS_KEY",
        hide_env_values = true,
        global = true
    )]
    pub aws_secret_access_key: Option<Secret>,

    /// S3 session token, with temporary credentials.
    #[arg(long, env = "AWS_SESSION_TOKEN", hide_env_values = true, global = true)]
    pub aws_session_token: Option<Secret>,

    /// How long one store operation may keep retrying a failing S3 server (timeouts,
    /// 5xx, refused connections) before it counts as unavailable: the trainer then defers
    /// the run, the server keeps its model and tries again later.
    #[arg(long, env = "DDPM_STORE_TIMEOUT", default_value = "30s", value_parser = crate::parse_duration, global = true)]
    pub store_timeout: Duration,
}

/// What `--store` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    Dir(PathBuf),
    /// `s3://bucket/prefix`: the prefix without leading or trailing `/`, maybe empty.
    S3 {
        bucket: String,
        prefix: String,
    },
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::Dir(path) => write!(f, "{}", path.display()),
            StoreUrl::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            StoreUrl::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

/// Parses `--store`: `s3://bucket[/prefix]`, `file:///path` or a path. Any other scheme
/// is refused rather than taken for a directory named `gs:`.
pub fn parse_store_url(value: &str) -> Result<StoreUrl, String> {
    if let Some(rest) = value.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        // S3's rules: 3 to 63 of lowercase letters, digits, `.` and `-`.
        let valid_bucket = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
        if !valid_bucket {
            return Err(format!(
                "{bucket:?} is not a bucket name (3 to 63 lowercase letters, digits, `.`, `-`)"
            ));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|part| part == "." || part == "..") || prefix.contains("//") {
            return Err(format!("{prefix:?} is not a plain key prefix"));
        }
        return Ok(StoreUrl::S3 {
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
        });
    }
    if let Some(path) = value.strip_prefix("file://") {
        if !path.starts_with('/') {
            return Err("a file:// URL needs an absolute path (file:///srv/ckpt)".into());
        }
        return Ok(StoreUrl::Dir(PathBuf::from(path)));
    }
    if let Some((scheme, _)) = value.split_once("://") {
        return Err(format!(
            "unsupported store scheme {scheme:?}: expected s3://bucket/prefix or a directory"
        ));
    }
    if value.is_empty() {
        return Err("empty store location".into());
    }
    Ok(StoreUrl::Dir(PathBuf::from(value)))
}

/// A secret: its value is never printed (`Debug` and `Display` show `***`).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }
    /// The value, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Secret, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

/// The store to open, with everything needed to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSpec {
    Dir(PathBuf),
    S3(S3Spec),
}

/// An S3 bucket and prefix, and how to reach them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Spec {
    pub bucket: String,
    pub prefix: String,
    pub endpoint: Option<String>,
    pub region: String,
    pub virtual_hosted_style: bool,
    pub allow_http: bool,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<Secret>,
    pub session_token: Option<Secret>,
    /// How long an operation retries a failing server.
    pub timeout: Duration,
}

impl S3Spec {
    /// A bucket on an S3-compatible server at `endpoint` with static credentials, path
    /// style, http allowed (a test server's or a single host's settings).
    pub fn at_endpoint(endpoint: &str, bucket: &str, prefix: &str) -> S3Spec {
        S3Spec {
            bucket: bucket.to_owned(),
            prefix: prefix.trim_matches('/').to_owned(),
            endpoint: Some(endpoint.to_owned()),
            region: "us-east-1".into(),
            virtual_hosted_style: false,
            allow_http: true,
            access_key_id: Some("test".into()),
            secret_access_key: Some(Secret::new("test")),
            session_token: None,
            timeout: Duration::from_secs(30),
        }
    }
}

impl fmt::Display for S3Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        StoreUrl::S3 {
            bucket: self.bucket.clone(),
            prefix: self.prefix.clone(),
        }
        .fmt(f)?;
        if let Some(endpoint) = &self.endpoint {
            write!(f, " at {endpoint}")?;
        }
        Ok(())
    }
}

impl StoreOptions {
    /// The store in effect: `--store`'s, or the directory `default_dir`.
    pub fn spec(&self, default_dir: PathBuf) -> StoreSpec {
        match &self.store {
            None => StoreSpec::Dir(default_dir),
            Some(StoreUrl::Dir(path)) => StoreSpec::Dir(path.clone()),
            Some(StoreUrl::S3 { bucket, prefix }) => StoreSpec::S3(S3Spec {
                bucket: bucket.clone(),
                prefix: prefix.clone(),
                endpoint: self.s3_endpoint.clone(),
                region: self.s3_region.clone(),
                virtual_hosted_style: self.s3_virtual_hosted_style,
                allow_http: self.s3_allow_http,
                access_key_id: self.aws_access_key_id.clone(),
                secret_access_key: self.aws_secret_access_key.clone(),
                session_token: self.aws_session_token.clone(),
                timeout: self.store_timeout,
            }),
        }
    }

    /// Every default, no environment read.
    pub fn defaults() -> StoreOptions {
        StoreOptions {
            s3_region: "us-east-1".into(),
            store_timeout: Duration::from_secs(30),
            ..StoreOptions::default()
        }
    }
}

/// Secrets print as `***` (see [`Secret`]).
impl fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreOptions")
            .field("store", &self.store.as_ref().map(ToString::to_string))
            .field("s3_endpoint", &self.s3_endpoint)
            .field("s3_region", &self.s3_region)
            .field("s3_virtual_hosted_style", &self.s3_virtual_hosted_style)
            .field("s3_allow_http", &self.s3_allow_http)
            .field("aws_access_key_id", &self.aws_access_key_id)
            .field("aws_secret_access_key", &self.aws_secret_access_key)
            .field("aws_session_token", &self.aws_session_token)
            .field("store_timeout", &self.store_timeout)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls_parse() {
        assert_eq!(
            parse_store_url("s3://ddpm-ckpt/team/a/").unwrap(),
            StoreUrl::S3 {
                bucket: "ddpm-ckpt".into(),
                prefix: "team/a".into()
            }
        );
        assert_eq!(
            parse_store_url("s3://ddpm-ckpt").unwrap(),
            StoreUrl::S3 {
                bucket: "ddpm-ckpt".into(),
                prefix: String::new()
            }
        );
        assert_eq!(
            parse_store_url("file:///srv/ckpt").unwrap(),
            StoreUrl::Dir("/srv/ckpt".into())
        );
        assert_eq!(
            parse_store_url("./ckpt").unwrap(),
            StoreUrl::Dir("./ckpt".into())
        );
        assert_eq!(
            parse_store_url("s3://ddpm-ckpt/a").unwrap().to_string(),
            "s3://ddpm-ckpt/a"
        );
        for bad in [
            "s3://",
            "s3://UPPER",
            "s3://ab",
            "s3://b_ucket/x",
            "s3://bucket/../x",
            "s3://bucket/a//b",
            "gs://bucket/x",
            "file://relative",
            "",
        ] {
            assert!(parse_store_url(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn secrets_never_print() {
        let options = StoreOptions {
            store: Some(parse_store_url("s3://bucket/p").unwrap()),
            aws_access_key_id: Some("AKIDEXAMPLE".into()),
            aws_secret_access_key: Some(Secret::new("hunter2")),
            aws_session_token: Some(Secret::new("tok3n")),
            ..StoreOptions::defaults()
        };
        let spec = options.spec(PathBuf::from("/unused"));
        for printed in [
            format!("{options:?}"),
            format!("{spec:?}"),
            match &spec {
                StoreSpec::S3(s3) => s3.to_string(),
                StoreSpec::Dir(_) => unreachable!(),
            },
        ] {
            assert!(!printed.contains("hunter2"), "{printed}");
            assert!(!printed.contains("tok3n"), "{printed}");
        }
        let StoreSpec::S3(s3) = spec else { panic!() };
        assert_eq!(s3.secret_access_key.unwrap().expose(), "hunter2");
        assert_eq!(
            StoreOptions::defaults().spec(PathBuf::from("/d")),
            StoreSpec::Dir(PathBuf::from("/d"))
        );
    }
}
