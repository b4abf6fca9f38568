//! A storage wrapper that counts the bytes moved, for the bytes up/down metrics.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use async_trait::async_trait;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, ReadBuf};

use crate::storage::{Created, Download, Incomplete, ObjectInfo, Reader, Storage, StorageError};

#[derive(Debug)]
pub struct Metered {
    inner: Arc<dyn Storage>,
    up: Counter,
    down: Counter,
}

impl Metered {
    pub fn new(inner: Arc<dyn Storage>, up: Counter, down: Counter) -> Self {
        Self { inner, up, down }
    }
}

struct Counting {
    inner: Reader,
    counter: Counter,
}

impl AsyncRead for Counting {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(self.inner.as_mut().poll_read(cx, buf))?;
        self.counter.inc_by((buf.filled().len() - before) as u64);
        Poll::Ready(Ok(()))
    }
}

#[async_trait]
impl Storage for Metered {
    fn url(&self) -> String {
        self.inner.url()
    }
    async fn create(&self, key: &str, body: Reader) -> Result<Created, StorageError> {
        let body = Box::pin(Counting {
            inner: body,
            counter: self.up.clone(),
        });
        self.inner.create(key, body).await
    }
    async fn get(&self, key: &str) -> Result<Download, StorageError> {
        let d = self.inner.get(key).await?;
        Ok(Download {
            body: Box::pin(Counting {
                inner: d.body,
                counter: self.down.clone(),
            }),
            size: d.size,
        })
    }
    async fn get_tail(&self, key: &str, len: u64) -> Result<Vec<u8>, StorageError> {
        let tail = self.inner.get_tail(key, len).await?;
        self.down.inc_by(tail.len() as u64);
        Ok(tail)
    }
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StorageError> {
        self.inner.head(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        self.inner.list(prefix).await
    }
    async fn written_size(&self, object: &ObjectInfo) -> Result<u64, StorageError> {
        self.inner.written_size(object).await
    }
    async fn list_folders(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        self.inner.list_folders(prefix).await
    }
    async fn delete(&self, keys: &[String]) -> Result<(), StorageError> {
        self.inner.delete(keys).await
    }

    async fn list_incomplete(&self) -> Result<Vec<Incomplete>, StorageError> {
        self.inner.list_incomplete().await
    }

    async fn remove_incomplete(&self, item: &Incomplete) -> Result<(), StorageError> {
        self.inner.remove_incomplete(item).await
    }
}
