# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto", "relational"];
if header :count "gt" "received" "10" {
  fileinto "yes";
} else {
  fileinto "no";
}
