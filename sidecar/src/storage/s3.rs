//! `s3://bucket/prefix`: Amazon S3 and S3-compatible servers through `aws-sdk-s3`.
//!
//! Credentials and region come from the standard AWS chain (environment,
//! profile, web identity / IRSA, instance metadata). Retries are done by the
//! callers around whole operations, so the SDK's own retries are off: the
//! retry budget a user configures is the one that applies.

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier};
use aws_sdk_s3::Client;
use aws_smithy_runtime_api::http::Response as HttpResponse;
use aws_smithy_types::error::display::DisplayErrorContext;
use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::task::JoinSet;

use super::{
    join_key, Created, Download, ErrorKind, Incomplete, ObjectInfo, Reader, Storage, StorageError,
};

/// S3 connection settings beyond what the AWS chain provides.
#[derive(Debug, Clone)]
pub struct S3Settings {
    /// Custom endpoint for S3-compatible servers (`WALDEN_S3_ENDPOINT`).
    pub endpoint: Option<String>,
    /// Path-style addressing (`WALDEN_S3_PATH_STYLE`), needed by most S3-compatible servers.
    pub path_style: bool,
    /// Objects larger than this are sent as multipart uploads of this part size.
    pub part_size: usize,
    /// Parts of one object uploaded at once.
    pub upload_concurrency: usize,
}

impl Default for S3Settings {
    fn default() -> Self {
        Self {
            endpoint: None,
            path_style: false,
            part_size: MIN_PART_SIZE,
            upload_concurrency: 2,
        }
    }
}

/// S3 rejects multipart parts smaller than this (except the last).
const MIN_PART_SIZE: usize = 5 << 20;
/// DeleteObjects takes at most this many keys.
const DELETE_BATCH: usize = 1000;

#[derive(Debug, Clone)]
pub struct S3Storage {
    client: Client,
    /// Where requests go, as errors name it (`http://minio:9000`, `Amazon S3`).
    endpoint: String,
    bucket: String,
    prefix: String,
    part_size: usize,
    upload_concurrency: usize,
}

/// An HTTP client that trusts the system's CA roots, or none: images
/// without `ca-certificates` must still reach a plain `http://` endpoint, and
/// the SDK's default client refuses to start (panics) without roots.
fn http_client(
    native_roots: bool,
) -> Result<aws_smithy_runtime_api::client::http::SharedHttpClient, StorageError> {
    use aws_smithy_http_client::tls;
    let context = tls::TlsContext::builder()
        .with_trust_store(tls::TrustStore::empty().with_native_roots(native_roots))
        .build()
        .map_err(|e| StorageError::config(format!("setting up TLS for S3: {e}")))?;
    Ok(aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::AwsLc,
        ))
        .tls_context(context)
        .build_https())
}

impl S3Storage {
    pub async fn connect(
        bucket: &str,
        prefix: &str,
        settings: &S3Settings,
    ) -> Result<Self, StorageError> {
        let endpoint = settings.endpoint.as_deref().filter(|e| !e.is_empty());
        let plain = endpoint.is_some_and(|e| e.to_ascii_lowercase().starts_with("http://"));
        let native_roots = !rustls_native_certs::load_native_certs().certs.is_empty();
        if !plain && !native_roots {
            return Err(StorageError::config(format!(
                "no CA certificates found to verify TLS to {}: install the ca-certificates \
                 package, set SSL_CERT_FILE to a PEM bundle, or use an http:// endpoint",
                endpoint.unwrap_or("Amazon S3")
            )));
        }
        let client = http_client(native_roots)?;
        let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .http_client(client.clone())
            .load()
            .await;
        let mut conf = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(settings.path_style)
            .retry_config(aws_config::retry::RetryConfig::disabled())
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .read_timeout(Duration::from_secs(60))
                    .build(),
            );
        if let Some(endpoint) = endpoint {
            url::Url::parse(endpoint).map_err(|e| {
                StorageError::config(format!(
                    "S3 endpoint {endpoint:?} is not a URL ({e}); e.g. http://127.0.0.1:9000"
                ))
            })?;
            conf = conf.endpoint_url(endpoint);
        }
        if shared.region().is_none() {
            // S3-compatible servers rarely care; AWS itself needs AWS_REGION set.
            conf = conf.region(aws_sdk_s3::config::Region::new("us-east-1"));
        }
        let part_size = settings.part_size.max(MIN_PART_SIZE);
        Ok(Self {
            client: Client::from_conf(conf.build()),
            endpoint: endpoint.unwrap_or("Amazon S3").to_string(),
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            part_size,
            upload_concurrency: settings.upload_concurrency.max(1),
        })
    }

    fn full_key(&self, key: &str) -> String {
        join_key(&self.prefix, key)
    }

    fn location(&self, key: &str) -> String {
        format!("s3://{}/{}", self.bucket, self.full_key(key))
    }

    async fn upload_multipart(
        &self,
        key: &str,
        first: BytesMut,
        body: &mut Reader,
    ) -> Result<Created, StorageError> {
        let loc = self.location(key);
        let full = self.full_key(key);
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
            .map_err(|e| classify(&self.endpoint, "start multipart upload", &loc, e))?;
        let upload_id = created.upload_id().unwrap_or_default().to_string();
        let result = self.upload_parts(key, &upload_id, first, body).await;
        let result = match result {
            Ok(parts) => {
                let done = self
                    .client
                    .complete_multipart_upload()
                    .bucket(&self.bucket)
                    .key(&full)
                    .upload_id(&upload_id)
                    .if_none_match("*")
                    .multipart_upload(
                        CompletedMultipartUpload::builder()
                            .set_parts(Some(parts))
                            .build(),
                    )
                    .send()
                    .await;
                match done {
                    Ok(_) => Ok(Created::Created),
                    Err(e) if is_precondition_failed(&e) => Ok(Created::AlreadyExists),
                    Err(e) => Err(classify(
                        &self.endpoint,
                        "complete multipart upload",
                        &loc,
                        e,
                    )),
                }
            }
            Err(e) => Err(e),
        };
        if !matches!(result, Ok(Created::Created)) {
            if let Err(e) = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(&full)
                .upload_id(&upload_id)
                .send()
                .await
            {
                tracing::warn!(object = %loc, error = %DisplayErrorContext(&e), "could not abort multipart upload");
            }
        }
        result
    }

    /// Reads the body part by part, keeping at most `upload_concurrency` parts in flight.
    async fn upload_parts(
        &self,
        key: &str,
        upload_id: &str,
        first: BytesMut,
        body: &mut Reader,
    ) -> Result<Vec<CompletedPart>, StorageError> {
        let loc = self.location(key);
        let mut inflight = JoinSet::new();
        let mut parts = Vec::new();
        let mut next = Some(first);
        let mut number = 0i32;
        loop {
            while inflight.len() >= self.upload_concurrency {
                parts.push(join_part(&mut inflight, &loc).await?);
            }
            let chunk = match next.take() {
                Some(c) => c,
                None => read_chunk(body, self.part_size)
                    .await
                    .map_err(|e| StorageError::io("read upload body for", &loc, e))?,
            };
            if chunk.is_empty() {
                break;
            }
            let last = chunk.len() < self.part_size;
            number += 1;
            let req = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(self.full_key(key))
                .upload_id(upload_id)
                .part_number(number)
                .body(ByteStream::from(chunk.freeze()));
            let loc = loc.clone();
            let endpoint = self.endpoint.clone();
            inflight.spawn(async move {
                let out = req
                    .send()
                    .await
                    .map_err(|e| classify(&endpoint, "upload part of", &loc, e))?;
                Ok::<_, StorageError>(
                    CompletedPart::builder()
                        .part_number(number)
                        .set_e_tag(out.e_tag().map(str::to_string))
                        .set_checksum_crc32(out.checksum_crc32().map(str::to_string))
                        .set_checksum_crc32_c(out.checksum_crc32_c().map(str::to_string))
                        .set_checksum_sha256(out.checksum_sha256().map(str::to_string))
                        .build(),
                )
            });
            if last {
                break;
            }
        }
        while !inflight.is_empty() {
            parts.push(join_part(&mut inflight, &loc).await?);
        }
        parts.sort_by_key(|p| p.part_number());
        Ok(parts)
    }
}

async fn join_part(
    set: &mut JoinSet<Result<CompletedPart, StorageError>>,
    loc: &str,
) -> Result<CompletedPart, StorageError> {
    match set.join_next().await {
        Some(Ok(r)) => r,
        Some(Err(e)) => Err(StorageError::new(
            ErrorKind::Transient,
            "upload part of",
            loc,
            e,
        )),
        None => Err(StorageError::new(
            ErrorKind::Transient,
            "upload part of",
            loc,
            "no part in flight",
        )),
    }
}

/// Fills a buffer of up to `size` bytes; shorter only at the end of the body.
async fn read_chunk(body: &mut Reader, size: usize) -> std::io::Result<BytesMut> {
    let mut buf = BytesMut::with_capacity(size);
    while buf.len() < size {
        if body.read_buf(&mut buf).await? == 0 {
            break;
        }
    }
    Ok(buf)
}

fn is_precondition_failed<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> bool {
    matches!(err, SdkError::ServiceError(s) if s.err().code() == Some("PreconditionFailed"))
        || status_of(err) == Some(412)
}

fn status_of<E>(err: &SdkError<E, HttpResponse>) -> Option<u16> {
    err.raw_response().map(|r| r.status().as_u16())
}

fn to_utc(t: &aws_smithy_types::DateTime) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::from_timestamp(t.secs(), t.subsec_nanos())
}

/// Maps an SDK error to a storage error: 404 is NotFound; network failures,
/// timeouts, throttling and 5xx are transient; the rest (403, bad requests) is permanent.
fn classify<E>(
    endpoint: &str,
    op: &'static str,
    object: &str,
    err: SdkError<E, HttpResponse>,
) -> StorageError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = status_of(&err);
    let kind = match &err {
        SdkError::ConstructionFailure(_) => ErrorKind::Permanent,
        SdkError::ServiceError(_) | SdkError::ResponseError(_) => match status {
            Some(404) => ErrorKind::NotFound,
            Some(s) if s >= 500 || s == 429 || s == 408 || s == 409 => ErrorKind::Transient,
            Some(_) => ErrorKind::Permanent,
            None => ErrorKind::Transient,
        },
        _ => ErrorKind::Transient,
    };
    // The server's error code and message say what is wrong; the SDK's full
    // context (raw response, headers) is only worth showing when they are absent.
    let service = err
        .as_service_error()
        .and_then(|e| e.code().map(|c| (c, e.message())));
    let message = match (status, kind, service) {
        (_, ErrorKind::NotFound, _) => "object not found".to_string(),
        (Some(s), _, Some((code, Some(text)))) => format!("HTTP {s} {code}: {text}"),
        (Some(s), _, Some((code, None))) => format!("HTTP {s} {code}"),
        (Some(s), _, None) => status_message(s),
        (None, _, _) => transport_message(endpoint, &err),
    };
    StorageError::new(kind, op, object, message)
}

/// An HTTP error without an S3 error code (a proxy's 502 page, an empty
/// 403): the status says it all; the SDK's rendering would dump the raw
/// response (its inner error is only "Error").
fn status_message(status: u16) -> String {
    format!("HTTP {status} without an S3 error code")
}

/// A failure with no HTTP response (nothing listens, DNS, TLS, a timeout),
/// said in one line: what failed and the root cause. The SDK's own
/// rendering appends a Debug dump of every wrapper, which users then see
/// in conditions and logs.
fn transport_message<E, R>(endpoint: &str, err: &SdkError<E, R>) -> String
where
    E: std::error::Error + 'static,
    R: std::fmt::Debug + 'static,
{
    let what = match err {
        SdkError::DispatchFailure(d) if d.is_timeout() => {
            format!("timed out connecting to {endpoint}")
        }
        SdkError::DispatchFailure(d) if d.is_io() => format!("cannot connect to {endpoint}"),
        SdkError::DispatchFailure(_) => format!("request to {endpoint} failed"),
        SdkError::TimeoutError(_) => format!("timed out waiting for {endpoint}"),
        SdkError::ResponseError(_) => format!("unreadable response from {endpoint}"),
        SdkError::ConstructionFailure(_) => "could not build the request".to_string(),
        _ => format!("request to {endpoint} failed"),
    };
    match root_cause(err) {
        Some(cause) => format!("{what}: {cause}"),
        None => what,
    }
}

/// The innermost message of an error's source chain (it names the real
/// problem: "Connection refused (os error 111)"), bounded in length.
fn root_cause(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    const MAX: usize = 300;
    let mut inner = err.source()?;
    while let Some(next) = inner.source() {
        inner = next;
    }
    let text = inner.to_string();
    if text.len() <= MAX {
        return Some(text);
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Some(format!("{}…", &text[..end]))
}

#[async_trait]
impl Storage for S3Storage {
    fn url(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }

    async fn create(&self, key: &str, mut body: Reader) -> Result<Created, StorageError> {
        let loc = self.location(key);
        let first = read_chunk(&mut body, self.part_size)
            .await
            .map_err(|e| StorageError::io("read upload body for", &loc, e))?;
        if first.len() == self.part_size {
            return self.upload_multipart(key, first, &mut body).await;
        }
        let put = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .if_none_match("*")
            .body(ByteStream::from(first.freeze()))
            .send()
            .await;
        match put {
            Ok(_) => Ok(Created::Created),
            Err(e) if is_precondition_failed(&e) => Ok(Created::AlreadyExists),
            Err(e) => Err(classify(&self.endpoint, "upload", &loc, e)),
        }
    }

    async fn get(&self, key: &str) -> Result<Download, StorageError> {
        let loc = self.location(key);
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
            .map_err(|e| classify(&self.endpoint, "download", &loc, e))?;
        let size = out.content_length().unwrap_or_default().max(0) as u64;
        Ok(Download {
            body: Box::pin(out.body.into_async_read()),
            size,
        })
    }

    async fn get_tail(&self, key: &str, len: u64) -> Result<Vec<u8>, StorageError> {
        let loc = self.location(key);
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .range(format!("bytes=-{len}"))
            .send()
            .await;
        let out = match out {
            Ok(o) => o,
            // An empty object has no satisfiable range.
            Err(e) if status_of(&e) == Some(416) => return Ok(Vec::new()),
            Err(e) => return Err(classify(&self.endpoint, "download", &loc, e)),
        };
        let bytes = out
            .body
            .collect()
            .await
            .map_err(|e| StorageError::new(ErrorKind::Transient, "download", &loc, e))?;
        Ok(bytes.into_bytes().to_vec())
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StorageError> {
        let loc = self.location(key);
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
        {
            Ok(o) => Ok(Some(ObjectInfo {
                key: key.to_string(),
                size: o.content_length().unwrap_or_default().max(0) as u64,
                modified: o.last_modified().and_then(to_utc),
            })),
            Err(e) => {
                let err = classify(&self.endpoint, "stat", &loc, e);
                if err.is_not_found() {
                    Ok(None)
                } else {
                    Err(err)
                }
            }
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        let loc = self.location(prefix);
        let full = self.full_key(prefix);
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&full)
            .into_paginator()
            .send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| classify(&self.endpoint, "list", &loc, e))?;
            for obj in page.contents() {
                let Some(k) = obj.key() else { continue };
                let Some(rel) = k.strip_prefix(&strip) else {
                    continue;
                };
                out.push(ObjectInfo {
                    key: rel.to_string(),
                    size: obj.size().unwrap_or_default().max(0) as u64,
                    modified: obj.last_modified().and_then(to_utc),
                });
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn list_folders(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        let loc = self.location(prefix);
        let full = format!("{}/", self.full_key(prefix.trim_end_matches('/')));
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&full)
            .delimiter("/")
            .into_paginator()
            .send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| classify(&self.endpoint, "list", &loc, e))?;
            for p in page.common_prefixes() {
                if let Some(name) = p.prefix().and_then(|p| p.strip_prefix(&full)) {
                    out.push(name.trim_end_matches('/').to_string());
                }
            }
        }
        out.sort();
        Ok(out)
    }

    async fn delete(&self, keys: &[String]) -> Result<(), StorageError> {
        for batch in keys.chunks(DELETE_BATCH) {
            let ids = batch
                .iter()
                .map(|k| ObjectIdentifier::builder().key(self.full_key(k)).build())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| StorageError::new(ErrorKind::Permanent, "delete", self.url(), e))?;
            let delete = Delete::builder()
                .set_objects(Some(ids))
                .quiet(true)
                .build()
                .map_err(|e| StorageError::new(ErrorKind::Permanent, "delete", self.url(), e))?;
            let out = self
                .client
                .delete_objects()
                .bucket(&self.bucket)
                .delete(delete)
                .send()
                .await
                .map_err(|e| classify(&self.endpoint, "delete", &self.location(&batch[0]), e))?;
            if let Some(failed) = out.errors().first() {
                return Err(StorageError::new(
                    ErrorKind::Transient,
                    "delete",
                    format!("s3://{}/{}", self.bucket, failed.key().unwrap_or_default()),
                    format!(
                        "{} ({} of {} keys failed)",
                        failed.message().unwrap_or("error"),
                        out.errors().len(),
                        batch.len()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Multipart uploads never completed nor aborted (a process killed mid-upload).
    async fn list_incomplete(&self) -> Result<Vec<Incomplete>, StorageError> {
        let loc = self.url();
        let prefix = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let mut out = Vec::new();
        let mut key_marker: Option<String> = None;
        let mut upload_marker: Option<String> = None;
        loop {
            let page = self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .prefix(&prefix)
                .set_key_marker(key_marker.take())
                .set_upload_id_marker(upload_marker.take())
                .send()
                .await
                .map_err(|e| classify(&self.endpoint, "list multipart uploads in", &loc, e))?;
            for u in page.uploads() {
                let (Some(key), Some(id)) = (u.key(), u.upload_id()) else {
                    continue;
                };
                let Some(rel) = key.strip_prefix(&prefix) else {
                    continue;
                };
                out.push(Incomplete {
                    key: rel.to_string(),
                    handle: id.to_string(),
                    started: u.initiated().and_then(to_utc),
                });
            }
            key_marker = page.next_key_marker().map(str::to_string);
            upload_marker = page.next_upload_id_marker().map(str::to_string);
            if page.is_truncated() != Some(true) || key_marker.is_none() {
                break;
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn remove_incomplete(&self, item: &Incomplete) -> Result<(), StorageError> {
        let loc = self.location(&item.key);
        match self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(self.full_key(&item.key))
            .upload_id(&item.handle)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if status_of(&e) == Some(404) => Ok(()),
            Err(e) => Err(classify(
                &self.endpoint,
                "abort multipart upload of",
                &loc,
                e,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An S3 storage at `endpoint` with static credentials (no AWS chain).
    fn storage_at(endpoint: &str) -> S3Storage {
        let conf = aws_sdk_s3::config::Builder::new()
            .behavior_version(aws_config::BehaviorVersion::latest())
            .http_client(http_client(false).expect("http client"))
            .credentials_provider(aws_sdk_s3::config::Credentials::new(
                "key", "secret", None, None, "test",
            ))
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .endpoint_url(endpoint)
            .force_path_style(true)
            .retry_config(aws_config::retry::RetryConfig::disabled())
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .build(),
            )
            .build();
        S3Storage {
            client: Client::from_conf(conf),
            endpoint: endpoint.to_string(),
            bucket: "backups".into(),
            prefix: "pg".into(),
            part_size: MIN_PART_SIZE,
            upload_concurrency: 1,
        }
    }

    #[test]
    fn transport_failures_name_what_failed_and_the_root_cause() {
        use aws_sdk_s3::operation::head_object::HeadObjectError;
        use aws_smithy_runtime_api::client::result::ConnectorError;
        type Err = SdkError<HeadObjectError, HttpResponse>;
        let io = |m: &str| std::io::Error::other(m.to_string());
        let wrapped = |m: &str| -> Box<dyn std::error::Error + Send + Sync> {
            Box::new(std::io::Error::other(io(m)))
        };
        let long = "x".repeat(1000);
        let cases: Vec<(Err, &str)> = vec![
            (
                SdkError::dispatch_failure(ConnectorError::io(wrapped("Connection refused"))),
                "cannot connect to http://s3:9000: Connection refused",
            ),
            (
                SdkError::dispatch_failure(ConnectorError::timeout(wrapped("deadline"))),
                "timed out connecting to http://s3:9000: deadline",
            ),
            (
                SdkError::dispatch_failure(ConnectorError::other(
                    wrapped("invalid peer certificate: UnknownIssuer"),
                    None,
                )),
                "request to http://s3:9000 failed: invalid peer certificate: UnknownIssuer",
            ),
            (
                SdkError::timeout_error(io("read timed out")),
                "timed out waiting for http://s3:9000: read timed out",
            ),
        ];
        for (err, want) in cases {
            assert_eq!(transport_message("http://s3:9000", &err), want);
        }
        let bare = HeadObjectError::generic(aws_sdk_s3::error::ErrorMetadata::builder().build());
        let response = HttpResponse::new(
            502.try_into().expect("status"),
            aws_smithy_types::body::SdkBody::from("<html>bad gateway</html>"),
        );
        let err = classify(
            "http://s3:9000",
            "stat",
            "s3://b/k",
            SdkError::<HeadObjectError, HttpResponse>::service_error(bare, response),
        );
        assert_eq!(err.kind, ErrorKind::Transient);
        assert_eq!(
            err.to_string(),
            "stat s3://b/k: HTTP 502 without an S3 error code"
        );
        let err: Err = SdkError::dispatch_failure(ConnectorError::io(wrapped(&long)));
        let msg = transport_message("http://s3:9000", &err);
        assert!(msg.len() < 400 && msg.ends_with('…'), "{} chars", msg.len());
    }

    #[tokio::test]
    async fn a_refused_connection_is_one_short_line_with_the_cause() {
        // A loopback port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let endpoint = format!("http://127.0.0.1:{port}");
        let err = storage_at(&endpoint)
            .head("wal/000000010000000000000001")
            .await
            .expect_err("nothing listens");
        let msg = err.to_string();
        assert_eq!(err.kind, ErrorKind::Transient);
        assert!(
            msg.contains(&format!("cannot connect to {endpoint}"))
                && msg.to_lowercase().contains("connection refused"),
            "{msg}"
        );
        assert!(
            !msg.contains("DispatchFailure") && !msg.contains('{'),
            "{msg}"
        );
        assert!(msg.len() < 200, "{} chars: {msg}", msg.len());
    }
}
