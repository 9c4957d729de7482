//! The box's own user database: inside a box, uid and gid [`AGENT_UID`] are `agent` (home
//! `/home/agent`), whatever user of that uid the image's (or host's) `/etc/passwd` names.
//! Every backend places these files over the root's `/etc/passwd` and `/etc/group`.

#[cfg(doc)]
use crate::AGENT_UID;

pub const AGENT_NAME: &str = "agent";

/// `passwd` as the box shows it: the image's entries without any that claim the agent's name
/// or `uid`, then the agent's, as `uid` (the agent's uid as processes in the box see it:
/// [`AGENT_UID`] where the box has a user namespace).
pub fn passwd(image: &str, uid: u32) -> String {
    let mut out = without(image, 2, uid);
    out.push_str(&format!(
        "{AGENT_NAME}:x:{uid}:{uid}:berth agent:/home/agent:/bin/sh\n"
    ));
    out
}

/// `group` as the box shows it (see [`passwd`]).
pub fn group(image: &str, gid: u32) -> String {
    let mut out = without(image, 2, gid);
    out.push_str(&format!("{AGENT_NAME}:x:{gid}:\n"));
    out
}

/// The lines of `db` whose name is not the agent's and whose id (field `id_field`) is not
/// `id`.
fn without(db: &str, id_field: usize, id: u32) -> String {
    let agent = id.to_string();
    let mut out = String::new();
    for line in db.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.first() == Some(&AGENT_NAME) || fields.get(id_field) == Some(&agent.as_str()) {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_replaces_the_images_user_of_its_uid() {
        let p = passwd(
            "root:x:0:0:root:/root:/bin/bash\ndev:x:1000:1000::/home/dev:/bin/sh\n",
            1000,
        );
        assert_eq!(
            p,
            "root:x:0:0:root:/root:/bin/bash\nagent:x:1000:1000:berth agent:/home/agent:/bin/sh\n"
        );
        let g = group("root:x:0:\nagent:x:77:\ndev:x:1000:\n", 1000);
        assert_eq!(g, "root:x:0:\nagent:x:1000:\n");
    }
}
