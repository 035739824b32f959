# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto", "variables"];
if string :is "${nothere}" "" { fileinto "empty"; } else { fileinto "nonempty"; }
