//! `/alarms`: firing, pending, acknowledged and recent alarms (filled in next).

use super::context::{html, text, Ctx, Reply, Req};
use super::layout;
use hyper::StatusCode;

pub async fn get(ctx: &Ctx, req: &Req) -> Reply {
    let inner = "<p>Alarms</p>";
    if req.wants_live() {
        return html(StatusCode::OK, inner.to_string());
    }
    html(
        StatusCode::OK,
        layout::page(
            ctx,
            "Alarms",
            "/alarms",
            "",
            &layout::live("/alarms", inner),
        ),
    )
}

pub async fn post_ack(ctx: &Ctx, _req: &Req) -> Reply {
    if !ctx.user.may_acknowledge() {
        return text(
            StatusCode::FORBIDDEN,
            "Only operators may acknowledge alarms.",
        );
    }
    text(StatusCode::NOT_IMPLEMENTED, "not yet")
}
