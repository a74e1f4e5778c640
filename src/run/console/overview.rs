//! `/`: every device and metric with its latest value (filled in next).

use super::context::{html, Ctx, Reply, Req};
use super::layout;
use hyper::StatusCode;

pub async fn get(ctx: &Ctx, req: &Req) -> Reply {
    let inner = "<p>Overview</p>";
    if req.wants_live() {
        return html(StatusCode::OK, inner.to_string());
    }
    html(
        StatusCode::OK,
        layout::page(ctx, "Overview", "/", "", &layout::live("/", inner)),
    )
}
