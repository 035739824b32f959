# envelope: from=alice@example.org to=bob+lists@example.com message=messages/large.eml
require ["fileinto", "relational"];
if header :value "gt" "x-spam-score" "5" {
  fileinto "yes";
} else {
  fileinto "no";
}
