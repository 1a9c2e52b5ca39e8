//! A real Chromium for the dashboard's tests: Debian's `chromium`, driven
//! through its `chromedriver` over WebDriver (fantoccini). Each [`Browser`]
//! has its own chromedriver on a free port and its own profile directory,
//! both gone when it is dropped. `scripts/test.sh` installs both packages
//! (`ensure_chromium`); a test run without them fails, naming what is
//! missing, rather than skipping.
//!
//! `TEST_SCREENSHOTS=<dir>` makes [`Browser::screenshot`] write PNGs
//! there (`scripts/screenshots.sh` uses it for the README's pictures).

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use std::{path::PathBuf, process::Stdio, time::Duration};
use tokio::process::{Child, Command};

/// How long a page may take to show an element a test looks for.
const FIND_WITHIN: Duration = Duration::from_secs(20);
/// Clicks tried again when the element was re-rendered under them.
const STALE_RETRIES: usize = 5;

pub struct Browser {
    pub client: Client,
    /// The dashboard's origin, `http://127.0.0.1:<port>`.
    pub base: String,
    driver: Child,
    profile: PathBuf,
}

fn program(var: &str, default: &str) -> String {
    let path = std::env::var(var).unwrap_or_else(|_| default.to_owned());
    assert!(
        std::path::Path::new(&path).exists(),
        "{path} not found: the dashboard's browser tests need Debian's chromium and \
         chromium-driver (scripts/test.sh installs them), or set {var}"
    );
    path
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    l.local_addr().expect("its address").port()
}

impl Browser {
    /// A headless Chromium at `width`×`height`, for the API at `base`.
    pub async fn start(base: &str, width: u32, height: u32) -> Self {
        let chromium = program("TEST_CHROMIUM", "/usr/bin/chromium");
        let chromedriver = program("TEST_CHROMEDRIVER", "/usr/bin/chromedriver");
        let port = free_port();
        let profile =
            std::env::temp_dir().join(format!("warren-chromium-{}", uuid::Uuid::now_v7()));
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start chromedriver");
        let url = format!("http://127.0.0.1:{port}");
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--no-first-run", "--disable-extensions", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--metrics-recording-only",
                    format!("--window-size={width},{height}"),
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        });
        let caps = match caps {
            Value::Object(m) => m,
            _ => unreachable!("a JSON object"),
        };
        let client = crate::wait_until(
            "chromedriver to accept a session",
            Duration::from_secs(30),
            || {
                let (url, caps) = (url.clone(), caps.clone());
                async move {
                    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
                    ClientBuilder::new(connector)
                        .capabilities(caps)
                        .connect(&url)
                        .await
                        .ok()
                }
            },
        )
        .await;
        Self {
            client,
            base: base.trim_end_matches('/').to_owned(),
            driver,
            profile,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn goto(&self, path: &str) {
        self.client.goto(&self.url(path)).await.expect("navigate");
    }

    /// Opens `path`, which sends an unsigned-in browser to the sign-in
    /// form, and signs in there with `key`.
    pub async fn goto_signed_in(&self, path: &str, key: &str) {
        self.goto(path).await;
        let field = self
            .client
            .find(fantoccini::Locator::Css("input[name=key]"))
            .await
            .expect("the sign-in form");
        field.send_keys(key).await.expect("type the key");
        self.click_to_navigate("form button[type=submit]").await;
    }

    /// The path and query of the page shown now.
    pub async fn path(&self) -> String {
        let u = self.client.current_url().await.expect("current url");
        match u.query() {
            Some(q) => format!("{}?{q}", u.path()),
            None => u.path().to_owned(),
        }
    }

    /// The element `css` once the page shows it (a click's navigation may
    /// still be under way), within [`FIND_WITHIN`].
    pub async fn find(&self, css: &str) -> fantoccini::elements::Element {
        self.client
            .wait()
            .at_most(FIND_WITHIN)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no `{css}` on {}: {e}", self.url("")))
    }

    pub async fn text(&self, css: &str) -> String {
        self.find(css).await.text().await.expect("element text")
    }

    /// Clicks `css`. A live page re-renders its fragments (SSE): the
    /// element found may be replaced before the click lands, so a stale
    /// one is found again, a few times.
    pub async fn click(&self, css: &str) {
        for _ in 0..STALE_RETRIES {
            match self.find(css).await.click().await {
                Ok(()) => return,
                Err(fantoccini::error::CmdError::Standard(e))
                    if e.error == fantoccini::error::ErrorStatus::StaleElementReference => {}
                Err(e) => panic!("click `{css}`: {e}"),
            }
        }
        panic!("click `{css}`: the element went stale {STALE_RETRIES} times");
    }

    /// Clicks a link or a form's button and waits for the page it leads to
    /// to have loaded (a new document, not the old one still showing).
    pub async fn click_to_navigate(&self, css: &str) {
        self.js("window.warrenOldPage = true; return true").await;
        self.click(css).await;
        self.wait_js(
            &format!("the page after clicking `{css}`"),
            FIND_WITHIN,
            "return !window.warrenOldPage && document.readyState === 'complete'",
        )
        .await;
    }

    /// Runs `script` (a function body; `return` gives the value).
    pub async fn js(&self, script: &str) -> Value {
        self.client
            .execute(script, vec![])
            .await
            .expect("run script")
    }

    /// Waits until `script` returns something truthy, and returns it.
    pub async fn wait_js(&self, what: &str, timeout: Duration, script: &str) -> Value {
        crate::wait_until(what, timeout, || async {
            let v = self.js(script).await;
            let truthy =
                !matches!(&v, Value::Null | Value::Bool(false)) && v != json!("") && v != json!(0);
            truthy.then_some(v)
        })
        .await
    }

    /// Every URL the page loaded or links to that is not of this origin.
    pub async fn foreign_requests(&self) -> Vec<String> {
        let v = self
            .js(
                "const urls = performance.getEntriesByType('resource').map(e => e.name);\
                 for (const el of document.querySelectorAll('[src],[href],[action]')) {\
                   urls.push(el.src || el.href || el.action); }\
                 urls.push(location.href); return urls;",
            )
            .await;
        let own = format!("{}/", self.base);
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .filter(|u| !u.starts_with(&own))
            .map(str::to_owned)
            .collect()
    }

    /// Writes a PNG of the page as `<TEST_SCREENSHOTS>/<name>.png`, if set.
    pub async fn screenshot(&self, name: &str) {
        let Ok(dir) = std::env::var("TEST_SCREENSHOTS") else {
            return;
        };
        let png = self.client.screenshot().await.expect("screenshot");
        std::fs::create_dir_all(&dir).expect("screenshot directory");
        std::fs::write(PathBuf::from(dir).join(format!("{name}.png")), png)
            .expect("write screenshot");
    }

    /// Ends the session (Chromium quits) and chromedriver.
    pub async fn close(mut self) {
        let client = self.client.clone();
        let _ = client.close().await;
        let _ = self.driver.kill().await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // After a failed test Chromium may outlive its killed driver: it is
        // found by its profile directory, which is then removed.
        let _ = std::process::Command::new("pkill")
            .arg("-f")
            .arg(self.profile.display().to_string())
            .status();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}
