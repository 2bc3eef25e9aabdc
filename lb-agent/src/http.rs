//! A minimal HTTP/1.1 responder for the agent's small endpoints (health
//! checks, /healthz): one request per connection, no body, `Connection:
//! close`. A broken or slow client costs only its own connection: a request
//! is read up to [`MAX_REQUEST`] bytes, a connection lives at most
//! [`CONNECTION_TIMEOUT`], and at most [`MAX_CONNECTIONS`] are served at
//! once (more wait in the listen backlog).

use std::{sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// What a handler answers.
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    pub fn json(status: u16, body: String) -> Self {
        Response {
            status,
            content_type: "application/json",
            body,
        }
    }
}

/// Request method and path (without the query).
pub type Handler = Arc<dyn Fn(&str, &str) -> Response + Send + Sync>;

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// Bytes of request line and headers read before answering.
pub const MAX_REQUEST: usize = 16 * 1024;
/// Connections served at once per server.
pub const MAX_CONNECTIONS: usize = 64;
/// The longest a connection is served.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `listener` with `handler` until the task is dropped.
pub async fn serve(listener: TcpListener, handler: Handler) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        // A free slot first: beyond the limit, connections wait unaccepted.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                log::warn!("http: accept: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let answer = tokio::time::timeout(CONNECTION_TIMEOUT, answer(stream, &handler));
            if let Ok(Err(error)) = answer.await {
                log::debug!("http: connection: {error}");
            }
            drop(slot);
        });
    }
}

async fn answer(mut stream: TcpStream, handler: &Handler) -> std::io::Result<()> {
    let mut request = Vec::new();
    let mut chunk = [0u8; 1024];
    // The request line and headers; these endpoints take no body.
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < MAX_REQUEST {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&request);
    let mut words = text.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let response = handler(method, path);
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        response.status,
        reason(response.status),
        response.content_type,
        response.body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(response.body.as_bytes()).await?;
    stream.shutdown().await
}

/// RFC 3339 UTC timestamp (`2026-12-01T18:30:00Z`) of a system time, as the
/// Kubernetes API writes them.
pub fn rfc3339(time: std::time::SystemTime) -> String {
    let secs = time
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, UNIX_EPOCH};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// A server on 127.0.0.1 whose handler counts the requests it answers.
    async fn counting_server() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let answered = Arc::new(AtomicUsize::new(0));
        let count = answered.clone();
        let handler: Handler = Arc::new(move |_, path| {
            count.fetch_add(1, Ordering::SeqCst);
            Response::json(200, format!("{{\"path\": {path:?}}}"))
        });
        tokio::spawn(serve(listener, handler));
        (addr, answered)
    }

    async fn get(addr: std::net::SocketAddr, request: &[u8]) -> std::io::Result<String> {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(request).await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        Ok(String::from_utf8_lossy(&answer).into_owned())
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_wait_and_are_served_later() {
        let (addr, answered) = counting_server().await;
        // MAX_CONNECTIONS clients that connect and say nothing.
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(TcpStream::connect(addr).await.expect("connect"));
        }
        let waiting = tokio::spawn(get(addr, b"GET /healthz HTTP/1.0\r\n\r\n"));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            answered.load(Ordering::SeqCst),
            0,
            "answered past the limit"
        );
        assert!(!waiting.is_finished());
        // One idle client goes: the waiting one is served (bounded wait).
        drop(idle.pop());
        let answer = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("served once a slot was free")
            .expect("task")
            .expect("answer");
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        assert!(answer.ends_with("{\"path\": \"/healthz\"}"), "{answer}");
    }

    #[tokio::test]
    async fn a_huge_request_is_cut_at_the_limit_and_answered() {
        let (addr, answered) = counting_server().await;
        // 1 MiB of header without an end: the server reads MAX_REQUEST
        // bytes, answers, and closes; memory stays bounded.
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (mut reader, mut writer) = stream.into_split();
        let mut request = b"GET /healthz HTTP/1.1\r\nX-Junk: ".to_vec();
        request.resize(1024 * 1024, b'a');
        // The server stops reading at the limit and closes: the write
        // fails part way, which is the point.
        let sender = tokio::spawn(async move { writer.write_all(&request).await });
        let mut answer = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(10), reader.read_to_end(&mut answer)).await;
        assert!(closed.is_ok(), "the connection was not closed");
        let answer = String::from_utf8_lossy(&answer);
        // The close may reset the connection before the answer is read.
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 200 OK"),
            "{answer:?}"
        );
        assert_eq!(
            answered.load(Ordering::SeqCst),
            1,
            "answered once, after the limit"
        );
        let _ = tokio::time::timeout(Duration::from_secs(10), sender).await;
        // And the server still serves others.
        let answer = get(addr, b"GET /x HTTP/1.0\r\n\r\n").await.expect("answer");
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    }

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        // 2026-12-01T18:30:05Z
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_796_149_805)),
            "2026-12-01T18:30:05Z"
        );
        // A leap day.
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
    }
}
