# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto", "variables"];
set "w" "weekly";
if header :contains "subject" "${w}" { fileinto "found"; }
