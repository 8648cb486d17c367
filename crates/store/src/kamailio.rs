//! Reading the `subscriber` table of a Kamailio set-up (the seed design's MySQL database) for
//! migration. Kamailio's own schema has `username, domain, password, ha1, ha1b`; the seed added
//! `email, careflow_user_id, careflow_care4w_id`. Columns are found by name, in any case, so
//! either layout (and `HA1` in capitals) is read.

use mysql_async::prelude::Queryable;

use crate::StoreError;

/// One row as Kamailio stored it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KamailioSubscriber {
    /// `username`.
    pub username: String,
    /// `domain` (Kamailio's digest realm).
    pub domain: String,
    /// `password` in plain text, when Kamailio kept one.
    pub password: Option<String>,
    /// `ha1`: MD5(username:realm:password), hex.
    pub ha1: Option<String>,
    /// `email` / `email_address`, when the table has one.
    pub email: Option<String>,
    /// `careflow_user_id` (seed design).
    pub careflow_user_id: Option<String>,
    /// `careflow_care4w_id` (seed design).
    pub careflow_care4w_id: Option<String>,
}

/// Every row of `table` in the MySQL/MariaDB database at `url` (`mysql://` or `mariadb://`).
pub async fn read_mysql(url: &str, table: &str) -> Result<Vec<KamailioSubscriber>, StoreError> {
    if table.is_empty()
        || !table
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err(StoreError::Invalid(format!(
            "`{table}` is not a table name (letters, digits and _)"
        )));
    }
    let url = url.replacen("mariadb://", "mysql://", 1);
    let opts = mysql_async::Opts::from_url(&url)
        .map_err(|e| StoreError::Invalid(format!("Kamailio database URL: {e}")))?;
    let opts = mysql_async::OptsBuilder::from_opts(opts).prefer_socket(false);
    let mut conn = mysql_async::Conn::new(opts)
        .await
        .map_err(|e| StoreError::unavailable("mysql", e))?;
    let rows: Vec<mysql_async::Row> = conn
        .query(format!("SELECT * FROM `{table}`"))
        .await
        .map_err(|e| StoreError::unavailable("mysql", e))?;
    let _ = conn.disconnect().await;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let names: Vec<String> = row
            .columns_ref()
            .iter()
            .map(|c| c.name_str().to_ascii_lowercase())
            .collect();
        let get = |want: &[&str]| -> Option<String> {
            let i = names.iter().position(|n| want.contains(&n.as_str()))?;
            match row.as_ref(i)? {
                mysql_async::Value::Bytes(b) => Some(String::from_utf8_lossy(b).into_owned()),
                mysql_async::Value::Int(n) => Some(n.to_string()),
                mysql_async::Value::UInt(n) => Some(n.to_string()),
                _ => None,
            }
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
        };
        out.push(KamailioSubscriber {
            username: get(&["username"]).unwrap_or_default(),
            domain: get(&["domain"]).unwrap_or_default(),
            password: get(&["password"]),
            ha1: get(&["ha1"]),
            email: get(&["email", "email_address"]),
            careflow_user_id: get(&["careflow_user_id"]),
            careflow_care4w_id: get(&["careflow_care4w_id"]),
        });
    }
    Ok(out)
}
