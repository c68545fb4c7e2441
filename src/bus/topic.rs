//! Topic names: one topic by default, or a Debezium-style template per table.

use crate::event::TableSource;

use super::BusError;

/// The default topic.
pub const DEFAULT_TOPIC: &str = "inventorysync.changes";

/// A validated topic template: literal text and `{warehouse}`, `{schema}`, `{table}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    template: String,
    is_literal: bool,
}

impl Default for TopicTemplate {
    /// The single default topic, `inventorysync.changes`.
    fn default() -> Self {
        Self {
            template: DEFAULT_TOPIC.to_string(),
            is_literal: true,
        }
    }
}

impl TopicTemplate {
    /// Checks the template; `key` names the setting in errors.
    pub fn parse(key: &str, template: &str) -> Result<Self, BusError> {
        let bad = |reason: String| BusError::Config {
            key: key.to_string(),
            reason,
        };
        let mut rest = template;
        let mut literal = String::new();
        while let Some(open) = rest.find('{') {
            literal.push_str(&rest[..open]);
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| bad(format!("{template:?} has an unclosed '{{'")))?;
            let name = &rest[open + 1..open + close];
            if !matches!(name, "warehouse" | "schema" | "table") {
                return Err(bad(format!(
                    "{template:?} uses {{{name}}}; expected {{warehouse}}, {{schema}} or {{table}}"
                )));
            }
            rest = &rest[open + close + 1..];
        }
        literal.push_str(rest);
        if literal.contains('}') {
            return Err(bad(format!("{template:?} has an unmatched '}}'")));
        }
        if !literal.bytes().all(topic_char) {
            return Err(bad(format!(
                "{template:?} has characters Kafka does not allow in topic names; use a-z A-Z 0-9 . _ -"
            )));
        }
        if template.trim().is_empty() {
            return Err(bad("the topic template is empty".into()));
        }
        Ok(Self {
            is_literal: !template.contains('{'),
            template: template.to_string(),
        })
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.template
    }

    /// The topic for events of `table`. Characters Kafka forbids in names are replaced by `_`.
    pub fn topic_for(&self, table: &TableSource) -> String {
        if self.is_literal {
            return self.template.clone();
        }
        let clean = |s: &str| -> String {
            s.bytes()
                .map(|b| if topic_char(b) { b as char } else { '_' })
                .collect()
        };
        let mut t = self
            .template
            .replace("{warehouse}", &clean(table.warehouse_id()))
            .replace("{schema}", &clean(table.schema()))
            .replace("{table}", &clean(table.table()));
        t.truncate(249);
        t
    }
}

fn topic_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_fill_and_sanitize() {
        let t = TopicTemplate::parse("topic", "cdc.{warehouse}.{schema}.{table}").unwrap();
        let src = TableSource::new("wh east", "db", "public", "stock_levels");
        assert_eq!(t.topic_for(&src), "cdc.wh_east.public.stock_levels");
        let fixed = TopicTemplate::parse("topic", DEFAULT_TOPIC).unwrap();
        assert_eq!(fixed.topic_for(&src), DEFAULT_TOPIC);
    }

    #[test]
    fn bad_templates_name_the_problem() {
        for (bad, says) in [
            ("cdc.{db}", "{db}"),
            ("cdc.{table", "unclosed"),
            ("cdc table", "characters"),
            ("cdc}", "unmatched"),
            ("", "empty"),
        ] {
            let e = TopicTemplate::parse("KAFKA_TOPIC", bad)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("configuration key KAFKA_TOPIC"), "{e}");
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
