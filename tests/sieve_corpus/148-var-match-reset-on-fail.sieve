# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto", "variables"];
if header :matches "subject" "Weekly *" { set "a" "${1}"; }
if header :matches "subject" "Nomatch*" { set "b" "x"; }
fileinto "${1}";
