# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto"];
if header :contains ["x-nothere", "list-id"] "devel" {
  fileinto "yes";
} else {
  fileinto "no";
}
