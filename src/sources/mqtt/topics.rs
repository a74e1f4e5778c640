//! Topic filters and topic levels given in configuration, checked before rumqttc (which
//! asserts) or the broker (which refuses the subscription) see them.

/// Checks an MQTT topic filter: levels split by `/`, `+` only as a whole level, `#`
/// only as the whole last level.
pub fn check_topic_filter(filter: &str) -> Result<(), String> {
    if filter.is_empty() {
        return Err("the topic filter must not be empty".into());
    }
    if filter.len() > 65_535 || filter.contains('\0') {
        return Err("the topic filter is not valid MQTT".into());
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i != levels.len() - 1) {
            return Err(format!("{filter:?}: '#' must be the whole last level"));
        }
        if level.contains('+') && *level != "+" {
            return Err(format!("{filter:?}: '+' must be a whole level"));
        }
    }
    Ok(())
}

/// Checks one topic level given in configuration (an application id): no wildcards or
/// separators.
pub fn check_topic_level(value: &str, what: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{what} must not be empty"));
    }
    if let Some(c) = value
        .chars()
        .find(|c| matches!(c, '/' | '+' | '#' | '\0') || c.is_whitespace())
    {
        return Err(format!(
            "{what} {value:?} contains {c:?}, which cannot appear in an MQTT topic level"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_filters_are_checked() {
        for ok in ["a/b", "a/+/c", "#", "a/#", "+", "v3/app@ttn/devices/+/up"] {
            assert!(check_topic_filter(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a/#/b", "a/b#", "a/+b", "a+/b", "x\0y"] {
            assert!(check_topic_filter(bad).is_err(), "{bad:?}");
        }
        assert!(check_topic_level("bistro", "app").is_ok());
        for bad in ["", "a/b", "a+", "#", "a b"] {
            assert!(check_topic_level(bad, "app").is_err(), "{bad:?}");
        }
    }
}
